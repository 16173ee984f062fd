"""Dense vs 2:4 inference of an exported N:M-pruned model, measured side by side in one run.

GPU (CUDA, compute capability ≥ 8.0): the same exported weights run with dense kernels and with the 2:4 layers
converted by `to_sparse_semi_structured` (cuSPARSELt/CUTLASS sparse tensor cores), in fp16 and/or bf16, eager
and `torch.compile`, for each batch size; the ratio dense_time / sparse_time is printed per batch size, for the
whole model and for the encoder's Linear shapes alone.

CPU: there is no 2:4 kernel; the 2:4 model's zeros run through the same dense GEMMs (ratio ≈ 1 by construction).
What is measured instead is dense fp32 vs the 2:4 layers stored as CSR (`Tensor.to_sparse_csr`, the only sparse
Linear path on CPU in PyTorch), so the report says honestly whether anything runs faster.

Never run in CI. Examples::

    # exported model from the recipe run (results/nm_2_4_wanda/model), GPU, all settings:
    python benchmarks/bench_nm_inference.py --model results/nm_2_4_wanda/model \\
        --batch-sizes 1,8,32,64,128,256 --dtypes fp16,bf16 --modes eager,compile --out results/nm_inference/gpu.json
    # quick CPU check (2:4 magnitude mask applied to the embedded model on the fly):
    python benchmarks/bench_nm_inference.py --batch-sizes 1,8 --seq-len 64 --iters 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

from prune_trainer.export.semi_structured import is_nm_sparse, require_semi_structured_support, to_semi_structured
from prune_trainer.masking.selection import nm_mask

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def load_model(path: str | None) -> nn.Module:
    """The exported model at ``path``, or the embedded model with a 2:4 magnitude mask on its encoder Linears."""
    from transformers import AutoModelForTokenClassification

    if path:
        return AutoModelForTokenClassification.from_pretrained(path).eval()
    from prune_trainer.masking.inject import find_target_linears
    from prune_trainer.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(None)
    with torch.no_grad():
        for name in find_target_linears(model):
            w = model.get_submodule(name).weight
            w.mul_(nm_mask(w.abs(), 2, 4).to(w.dtype))
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_fn(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time (ms) of ``fn()`` over ``iters`` runs after ``warmup`` runs (no_grad: CSR weights fail
    under inference_mode)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def csr_linears(model: nn.Module) -> list[str]:
    """Swap 2:4 Linear weights for CSR tensors (CPU sparse path); return the converted names."""
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and is_nm_sparse(mod.weight):
            mod.weight = nn.Parameter(mod.weight.detach().to_sparse_csr(), requires_grad=False)
            names.append(name)
    return names


def encoder_linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    shapes = []
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and is_nm_sparse(mod.weight):
            shape = (mod.out_features, mod.in_features)
            if shape not in shapes:
                shapes.append(shape)
    return shapes


def bench_gpu(args, rows: list[dict]) -> None:
    import copy

    device = torch.device("cuda")
    require_semi_structured_support(device)
    base = load_model(args.model)
    shapes = encoder_linear_shapes(base)
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        dense = copy.deepcopy(base).to(device, dtype).eval()
        sparse = copy.deepcopy(base).to(device, dtype).eval()
        report = to_semi_structured(sparse)
        print(f"[{dname}] converted {len(report['converted'])} layers, left dense: {sorted(report['skipped'])}")
        for mode in args.modes:
            run_dense, run_sparse = dense, sparse
            if mode == "compile":
                try:
                    run_dense = torch.compile(dense, mode="max-autotune")
                    run_sparse = torch.compile(sparse, mode="max-autotune")
                except Exception as err:  # report, do not hide
                    print(f"[{dname}/{mode}] torch.compile failed: {err!r}")
                    continue
            for bs in args.batch_sizes:
                ids = torch.randint(1000, 2000, (bs, args.seq_len), device=device)
                am = torch.ones_like(ids)
                try:
                    inputs = dict(input_ids=ids, attention_mask=am)
                    t_d = time_fn(partial(run_dense, **inputs), device, args.warmup, args.iters)
                    t_s = time_fn(partial(run_sparse, **inputs), device, args.warmup, args.iters)
                except Exception as err:
                    print(f"[{dname}/{mode}/bs={bs}] failed: {err!r}")
                    continue
                rows.append(dict(part="model", dtype=dname, mode=mode, batch=bs, seq=args.seq_len,
                                 dense_ms=t_d, sparse_ms=t_s, speedup=t_d / t_s))
                print(f"model  {dname:5s} {mode:8s} bs={bs:4d}: dense {t_d:8.3f} ms  2:4 {t_s:8.3f} ms  "
                      f"speedup {t_d / t_s:5.2f}x", flush=True)
        # the encoder Linear shapes alone (tokens = batch · seq), eager
        for out_f, in_f in shapes:
            for bs in args.batch_sizes:
                lin = nn.Linear(in_f, out_f).to(device, dtype).eval()
                with torch.no_grad():
                    lin.weight.mul_(nm_mask(lin.weight.abs(), 2, 4).to(dtype))
                slin = copy.deepcopy(lin)
                slin.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(slin.weight.detach()),
                                           requires_grad=False)
                x = torch.randn(bs * args.seq_len, in_f, device=device, dtype=dtype)
                t_d = time_fn(partial(lin, x), device, args.warmup, args.iters)
                t_s = time_fn(partial(slin, x), device, args.warmup, args.iters)
                rows.append(dict(part=f"linear {in_f}->{out_f}", dtype=dname, mode="eager", batch=bs,
                                 seq=args.seq_len, dense_ms=t_d, sparse_ms=t_s, speedup=t_d / t_s))
                print(f"linear {in_f}->{out_f} {dname} bs={bs:4d}: dense {t_d:8.4f} ms  2:4 {t_s:8.4f} ms  "
                      f"speedup {t_d / t_s:5.2f}x", flush=True)


def bench_cpu(args, rows: list[dict]) -> None:
    import copy

    device = torch.device("cpu")
    base = load_model(args.model)
    dense = base
    csr = copy.deepcopy(base)
    names = csr_linears(csr)
    print(f"[cpu] 2:4 layers as CSR: {len(names)}")
    for bs in args.batch_sizes:
        ids = torch.randint(1000, 2000, (bs, args.seq_len))
        am = torch.ones_like(ids)
        t_d = time_fn(partial(dense, input_ids=ids, attention_mask=am), device, args.warmup, args.iters)
        try:
            t_s = time_fn(partial(csr, input_ids=ids, attention_mask=am), device, args.warmup, args.iters)
        except Exception as err:
            print(f"[cpu] CSR forward failed: {err!r}")
            return
        rows.append(dict(part="model", dtype="fp32", mode="eager-csr", batch=bs, seq=args.seq_len,
                         dense_ms=t_d, sparse_ms=t_s, speedup=t_d / t_s))
        print(f"model fp32 cpu bs={bs:4d}: dense(2:4 zeros) {t_d:9.2f} ms  CSR {t_s:9.2f} ms  "
              f"speedup {t_d / t_s:5.2f}x", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="exported pruned model dir (default: embedded + 2:4 magnitude)")
    parser.add_argument("--batch-sizes", default="1,8,32,64,128,256")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--dtypes", default="fp16,bf16", help="GPU dtypes: fp16,bf16")
    parser.add_argument("--modes", default="eager,compile", help="GPU: eager,compile")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--out", default=None, help="write the rows, device and command as JSON here")
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [d for d in args.dtypes if d not in ("fp16", "bf16")]
    if bad:
        parser.error(f"unsupported GPU dtype(s) {bad}; choose fp16,bf16")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    rows: list[dict] = []
    if use_cuda:
        device_name = torch.cuda.get_device_name(0)
        bench_gpu(args, rows)
    else:
        device_name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
                      f"torch threads {torch.get_num_threads()})"
        print("No CUDA GPU: 2:4 semi-structured kernels are GPU-only; timing dense vs CSR on CPU.")
        bench_cpu(args, rows)
    print(f"device: {device_name}; torch {torch.__version__}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(
            {"device": device_name, "torch": torch.__version__, "command": " ".join([sys.executable, *sys.argv]),
             "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
