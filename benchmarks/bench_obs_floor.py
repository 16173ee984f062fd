"""How fast could exact row-wise OBS be on this machine? Its two formulations' unavoidable kernels, timed alone.

    python benchmarks/bench_obs_floor.py --shapes 384x384,1536x384,384x1536 --sparsity 0.7 --threads 2

Exact greedy OBS needs, at every step t of every row, column q of that row's current inverse Hessian
``H⁻¹_t = (H_RR)⁻¹`` over its r = d − t remaining inputs (OBC, Frantar & Alistarh 2022, eq. 3–4). Two ways
to have it:

* **fold** (what ``prune_trainer/oneshot/obs.py`` does): keep every row's r × r matrix current, applying the
  downdates ``H⁻¹ −= v vᵀ`` of ``lazy`` steps as one batched rank-``lazy`` GEMM: 2·r² flops per row per step.
  Inside a window each step corrects its column with the window's unfolded downdates (a batched
  matrix-vector product, 2·r·t flops). Floor timed here: exactly those GEMMs and products, with r shrunk to the
  remaining inputs at every window (the least work; ``obs.py`` shrinks only when a quarter of the inputs is
  gone), for each ``--lazy``.
* **low-rank**: keep only the shared initial H⁻¹ and each row's downdate vectors ``V`` (t × r), computing
  the column as ``H⁻¹[:, q] − Vᵀ V[:, q]``: 2·r·t flops per row per step, fewer in total, but a batched
  matrix-vector product that streams all of ``V`` each step. Floor timed here: exactly those products
  (the faster of row chunks of 512 MB and of 24 MB, the latter small enough to stay in the L3 cache).

Both floors leave out everything else a real step does (scores, argmin, gathers, weight update), so
real OBS is slower than either. Each is printed next to ``obs_prune`` and ``sparsegpt_prune`` on the same
random layer (4096 correlated calibration tokens), then summed over the embedded MiniLM's 36 encoder
Linears (per block: 4 × 384x384, 1 × 1536x384, 1 × 384x1536).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from bench_oneshot import timed  # this folder is on sys.path when the script runs

from prune_trainer.devices import device_description
from prune_trainer.oneshot.base import LayerStats
from prune_trainer.oneshot.obs import obs_prune
from prune_trainer.oneshot.sparsegpt import sparsegpt_prune

LAYERS_PER_BLOCK = {(384, 384): 4, (1536, 384): 1, (384, 1536): 1}
BLOCKS = 6
CPU = torch.device("cpu")


def best_of(repeat: int, fn: Callable, *args: object) -> float:
    """Shortest CPU wall time of ``repeat`` calls (``bench_oneshot.timed``)."""
    return timed(CPU, fn, *args, repeat=repeat)[0]


def fold_floor(rows: int, d: int, n_prune: int, lazy: int, chunk_bytes: int = 512 * 2**20) -> Callable[[], None]:
    """The arithmetic of ``obs_prune`` with ``lazy`` steps per fold and nothing else, in its row chunks: per step
    t inside a window, the column correction ``coef (1 × t) @ V (t × r)`` (2·r·t flops per row); per window,
    the batched rank-``lazy`` downdate of every row's r × r inverse (2·r²·lazy flops per row), r = d − (steps
    done) at every window (the least work: ``obs_prune`` drops pruned inputs only when a quarter is gone).
    Buffers are filled before timing."""
    chunk = max(1, min(rows, chunk_bytes // (d * d * 4 * 2)))
    buf = torch.randn(chunk * d * d)
    vbuf = torch.randn(chunk * lazy * d)
    coef = torch.randn(chunk, 1, lazy)

    def run() -> None:
        for r0 in range(0, rows, chunk):
            B = min(chunk, rows - r0)
            for t0 in range(0, n_prune, lazy):
                r, nb = d - t0, min(lazy, n_prune - t0)
                base = buf[: B * r * r].view(B, r, r)
                V = vbuf[: B * nb * r].view(B, nb, r)
                for t in range(1, nb):
                    torch.bmm(coef[:B, :, :t], V[:, :t])
                base.baddbmm_(V.transpose(1, 2), V, alpha=-1.0)

    return run


def lowrank_floor(rows: int, d: int, n_prune: int, chunk_bytes: int = 512 * 2**20) -> Callable[[], None]:
    """Per step t, every row's ``coef (1 × t) @ V (t × r)`` over its r = d − t remaining inputs: the column
    of the current inverse from the downdate vectors, 2·r·t flops per row per step."""
    chunk = max(1, min(rows, chunk_bytes // (n_prune * d * 4)))
    V = torch.randn(chunk, n_prune, d)
    coef = torch.randn(chunk, 1, n_prune)

    def run() -> None:
        for r0 in range(0, rows, chunk):
            B = min(chunk, rows - r0)
            for t in range(1, n_prune):
                torch.bmm(coef[:B, :, :t], V[:B, :t, : d - t])

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="384x384,1536x384,384x1536", help="rows x input features, comma-separated")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lazy", default="32,64,128,256", help="steps per fold of the fold floors")
    parser.add_argument("--repeat", type=int, default=3, help="report the best of this many runs")
    args = parser.parse_args()
    if not 0.0 < args.sparsity < 1.0:
        parser.error(f"--sparsity must be in (0, 1), got {args.sparsity}")
    lazies = [int(v) for v in args.lazy.split(",")]
    torch.set_num_threads(args.threads)
    print(f"best of {args.repeat}, sparsity {args.sparsity}, {args.tokens} calibration tokens, "
          f"{device_description(CPU)}; seconds, (ratio to SparseGPT)")
    cols = ["SparseGPT", "OBS"] + [f"fold floor lazy {n}" for n in lazies] + ["low-rank floor"]
    print("| layer | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    g = torch.Generator().manual_seed(0)
    totals = dict.fromkeys(cols, 0.0)

    def row(name: str, t: dict[str, float]) -> str:
        ref = t["SparseGPT"]
        return f"| {name} | " + " | ".join(f"{t[c]:.3f} ({t[c] / ref:.1f}x)" for c in cols) + " |"

    for spec in args.shapes.split(","):
        rows, d = (int(v) for v in spec.split("x"))
        X = torch.randn(args.tokens, d, generator=g) @ torch.randn(d, d, generator=g) / d**0.5
        stats = LayerStats.from_inputs(X)
        W = torch.randn(rows, d, generator=g)
        n_prune = int(round(args.sparsity * d))
        t = {
            "SparseGPT": best_of(args.repeat, sparsegpt_prune, W, stats, args.sparsity),
            "OBS": best_of(args.repeat, obs_prune, W, stats, args.sparsity),
        }
        for n in lazies:
            t[f"fold floor lazy {n}"] = best_of(args.repeat, fold_floor(rows, d, n_prune, n))
        t["low-rank floor"] = min(  # streamed from memory, or a few rows at a time from the caches
            best_of(args.repeat, lowrank_floor(rows, d, n_prune, mb * 2**20)) for mb in (512, 24))
        count = BLOCKS * LAYERS_PER_BLOCK.get((rows, d), 0)
        for c in cols:
            totals[c] += count * t[c]
        print(row(spec, t), flush=True)
    if totals["SparseGPT"] > 0:
        print(row("model (36 Linears)", totals))


if __name__ == "__main__":
    main()
