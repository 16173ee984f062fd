"""Pruning time of each one-shot method on the same model and calibration data, side by side.

    PRUNE_TRAINER_CONLL_DIR=/work/shared/data/conll2003 nice -n 10 python benchmarks/bench_oneshot.py \
        --model results/dense/model --calib-samples 1024 --sparsity 0.5

Prints, per method, the wall time of the whole layer-sequential run (calibration forward passes +
statistics + pruning) and of the pruning math alone, with ratios to SparseGPT measured in the same
run; then OBS vectorised over rows against OBS one row at a time on one layer (``--layer-rows``).
Use ``--calib-samples 64 --methods wanda,sparsegpt`` for a quick check; ``--shapes 384x384,1536x384,384x1536``
times the per-layer pruners alone on random layers of the encoder's shapes.
"""

from __future__ import annotations

import argparse
import time

import torch

from prune_trainer.data.conll import load_conll_splits
from prune_trainer.models import load_model_and_tokenizer
from prune_trainer.oneshot.base import LayerStats
from prune_trainer.oneshot.calibration import calibration_batches, prune_sequential
from prune_trainer.oneshot.obs import obs_prune
from prune_trainer.oneshot.registry import get_method


def bench_methods(args: argparse.Namespace) -> None:
    splits = load_conll_splits(args.data_dir)
    _, tokenizer = load_model_and_tokenizer(args.model)
    batches = calibration_batches(splits["train"], tokenizer, args.calib_samples)
    times = {}
    for name in args.methods.split(","):
        model, _ = load_model_and_tokenizer(args.model)
        report = prune_sequential(model, batches, get_method(name), args.sparsity, progress=False)
        times[name] = (report.total_time_s, report.solve_time_s)
    ref = times.get("sparsegpt")
    print(f"{args.calib_samples} calibration sentences, sparsity {args.sparsity}, threads {torch.get_num_threads()}")
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


def bench_layer_shapes(shapes: list[tuple[int, int]], sparsity: float, tokens: int) -> None:
    """Per-layer solve time of every method on random layers of the encoder's shapes (same X)."""
    from prune_trainer.oneshot.registry import ONESHOT_METHODS

    g = torch.Generator().manual_seed(0)
    for rows, cols in shapes:
        X = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) / cols**0.5
        stats = LayerStats.from_inputs(X)
        W = torch.randn(rows, cols, generator=g)
        times = {}
        for name, method in ONESHOT_METHODS.items():
            t0 = time.perf_counter()
            method.prune(W, stats, sparsity)
            times[name] = time.perf_counter() - t0
        ref = times["sparsegpt"]
        print(f"layer {rows}x{cols} @ {sparsity}: " + ", ".join(
            f"{n} {t:.3f}s ({t / ref:.1f}x SparseGPT)" for n, t in times.items()))


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        bench_layer_shapes(shapes, args.sparsity, args.tokens)
        return
    bench_methods(args)
    if args.layer_rows:
        bench_obs_vectorisation(args.layer_rows, args.layer_cols, args.sparsity)


if __name__ == "__main__":
    main()
