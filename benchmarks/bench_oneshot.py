"""Pruning time of each one-shot method on the same model and calibration data, side by side.

    PRUNE_TRAINER_CONLL_DIR=/work/shared/data/conll2003 nice -n 10 python benchmarks/bench_oneshot.py \
        --model results/dense/model --calib-samples 1024 --sparsity 0.5

Prints, per method, the wall time of the whole layer-sequential run (calibration forward passes +
statistics + pruning) and of the pruning math alone, with ratios to SparseGPT measured in the same
run; then OBS vectorised over rows against OBS one row at a time on one layer (``--layer-rows``).
Use ``--calib-samples 64 --methods wanda,sparsegpt`` for a quick check; ``--shapes 384x384,1536x384,384x1536``
times the per-layer pruners alone on random layers of the encoder's shapes; add ``--obs-baseline REV`` to time
the OBS of git revision ``REV`` (its ``prune_trainer/oneshot/obs.py``) side by side with the current one on the
same layers.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from prune_trainer.data.conll import load_conll_splits
from prune_trainer.devices import device_description, resolve_device
from prune_trainer.models import load_model_and_tokenizer
from prune_trainer.oneshot.base import LayerStats
from prune_trainer.oneshot.calibration import calibration_batches, prune_sequential
from prune_trainer.oneshot.obs import obs_prune
from prune_trainer.oneshot.registry import get_method


def timed(device: torch.device, fn: Callable, *args: object, repeat: int = 1) -> tuple[float, object]:
    """Shortest wall time of ``repeat`` calls of ``fn(*args)`` including their queued CUDA work (the minimum
    is the least disturbed by other load on a shared machine), and the last result."""
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_methods(args: argparse.Namespace, device: torch.device) -> None:
    splits = load_conll_splits(args.data_dir)
    _, tokenizer = load_model_and_tokenizer(args.model)
    batches = calibration_batches(splits["train"], tokenizer, args.calib_samples)
    times = {}
    for name in args.methods.split(","):
        model, _ = load_model_and_tokenizer(args.model)
        report = prune_sequential(model.to(device), batches, get_method(name), args.sparsity, progress=False)
        times[name] = (report.total_time_s, report.solve_time_s)
    ref = times.get("sparsegpt")
    print(f"{args.calib_samples} calibration sentences, sparsity {args.sparsity}, {device_description(device)}")
    print(f"{'method':<10} {'total s':>9} {'solve s':>9} {'total/SparseGPT':>16} {'solve/SparseGPT':>16}")
    for name, (total, solve) in times.items():
        r1 = f"{total / ref[0]:.2f}" if ref else "-"
        r2 = f"{solve / ref[1]:.2f}" if ref else "-"
        print(f"{name:<10} {total:>9.2f} {solve:>9.2f} {r1:>16} {r2:>16}")


def bench_obs_vectorisation(rows: int, cols: int, sparsity: float) -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4 * cols, cols, generator=g) @ torch.randn(cols, cols, generator=g) / cols**0.5
    stats = LayerStats.from_inputs(X)
    W = torch.randn(rows, cols, generator=g)
    t0 = time.perf_counter()
    fast, _ = obs_prune(W, stats, sparsity)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow, _ = obs_prune(W, stats, sparsity, lazy=1, chunk_bytes=1)  # one row at a time, eager downdates
    t_slow = time.perf_counter() - t0
    same = torch.allclose(fast, slow, rtol=1e-3, atol=1e-4)
    print(f"OBS {rows}x{cols} at {sparsity}: batched+lazy {t_fast:.2f}s, row by row {t_slow:.2f}s, "
          f"speed-up {t_slow / t_fast:.1f}x, same result: {same}")


def load_obs_at(rev: str) -> Callable:
    """``obs_prune`` as committed at git revision ``rev`` (loaded from ``git show``, current imports)."""
    source = subprocess.run(
        ["git", "show", f"{rev}:prune_trainer/oneshot/obs.py"], check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"obs_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"obs_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.obs_prune


def bench_layer_shapes(
    shapes: list[tuple[int, int]], sparsity: float, tokens: int, obs_baseline: str = "",
    device: torch.device | None = None, repeat: int = 1,
) -> None:
    """Per-layer solve time of every method on random layers of the encoder's shapes (same X)."""
    from prune_trainer.oneshot.registry import ONESHOT_METHODS

    baseline = load_obs_at(obs_baseline) if obs_baseline else None
    device = device or torch.device("cpu")
    print(f"per-layer solve times (best of {repeat}), sparsity {sparsity}, {tokens} calibration tokens, "
          f"{device_description(device)}")
    g = torch.Generator().manual_seed(0)
    if device.type == "cuda":  # CUDA context, kernels and allocator warmed up outside the timings
        Xw = torch.randn(256, 64, generator=g).to(device)
        for method in ONESHOT_METHODS.values():
            method.prune(torch.randn(32, 64, generator=g).to(device), LayerStats.from_inputs(Xw), sparsity)
    for rows, cols in shapes:
        X = (torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) / cols**0.5).to(device)
        stats = LayerStats.from_inputs(X)
        W = torch.randn(rows, cols, generator=g).to(device)
        times, outputs = {}, {}
        for name, method in ONESHOT_METHODS.items():
            times[name], outputs[name] = timed(device, method.prune, W, stats, sparsity, repeat=repeat)
        agreement = ""
        if baseline is not None:
            W_new, keep_new = outputs["obs"]
            times[f"obs@{obs_baseline}"], (W_old, keep_old) = timed(device, baseline, W, stats, sparsity, repeat=repeat)
            err_new, err_old = (float(((W - Wh) @ X.T).norm()) for Wh in (W_new, W_old))
            same = float((keep_new == keep_old).float().mean())
            agreement = (f"; OBS vs obs@{obs_baseline}: masks {same:.4%} equal, "
                         f"reconstruction error {err_new:.6g} vs {err_old:.6g}")
        ref = times["sparsegpt"]
        print(f"layer {rows}x{cols} @ {sparsity}: " + ", ".join(
            f"{n} {t:.3f}s ({t / ref:.1f}x SparseGPT)" for n, t in times.items()) + agreement)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--data-dir")
    parser.add_argument("--calib-samples", type=int, default=1024)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt,obs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layer-rows", type=int, default=64, help="rows of the OBS vectorisation check (0: skip)")
    parser.add_argument("--layer-cols", type=int, default=384)
    parser.add_argument("--shapes", default="", help="per-layer mode, e.g. 384x384,1536x384,384x1536 (skips the model)")
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens in per-layer mode")
    parser.add_argument("--obs-baseline", default="", help="per-layer mode: also time OBS as of this git revision")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    parser.add_argument("--repeat", type=int, default=1, help="per-layer mode: report the best of this many runs")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        bench_layer_shapes(shapes, args.sparsity, args.tokens, args.obs_baseline, device, args.repeat)
        return
    bench_methods(args, device)
    if args.layer_rows:
        bench_obs_vectorisation(args.layer_rows, args.layer_cols, args.sparsity)


if __name__ == "__main__":
    main()
