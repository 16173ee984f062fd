"""Inference latency: a dense MiniLM-shaped encoder vs the same model with half its heads and FFN neurons removed.

Random weights (no download): `BertModel` with 6 layers × 384 hidden, 12 heads, 1536 FFN neurons. The pruned model
goes through the real path: `StructuredPruningCallback` (magnitude, per layer, target 0.5: 6 heads and 768
neurons kept in each layer), `export_structured_model`, `load_pruned_model`; its output is checked against the
masked model's. The two models alternate round by round on the same batch so machine noise hits both alike;
prints the median forward time of each and the ratio.

    python benchmarks/bench_structured.py --threads 2 --out results/benchmarks/structured_latency.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

from prune_trainer import StructuredPruningCallback, export_structured_model, load_pruned_model
from prune_trainer.bench import time_samples
from prune_trainer.io import atomic_write_text


def minilm_config() -> BertConfig:
    return BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                      intermediate_size=1536, max_position_embeddings=512)


def pruned_copy(seed: int, target: float, batch: dict[str, torch.Tensor], workdir: Path) -> tuple[BertModel, float]:
    """The structurally pruned model (exported and reloaded) and its max |Δ| to the masked model's output."""
    torch.manual_seed(seed)
    model = BertModel(minilm_config()).eval()
    pruner = StructuredPruningCallback(model, scope="layer", round_to_ffn=8)
    pruner.prune(0, target=target)
    with torch.inference_mode():
        masked = model(**batch).last_hidden_state
    export_structured_model(model, workdir / "pruned")
    pruned = load_pruned_model(workdir / "pruned").eval()
    with torch.inference_mode():
        diff = (pruned(**batch).last_hidden_state - masked).abs().max().item()
    return pruned, diff


def params(model: torch.nn.Module, skip: str = "embeddings") -> int:
    return sum(p.numel() for n, p in model.named_parameters() if skip not in n)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3, help="forwards per model per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--machine", default=f"{platform.processor() or platform.machine()}, CPU")
    parser.add_argument("--out", help="write the table as Markdown to this file")
    return parser.parse_args()


def _time_rows(dense: BertModel, pruned: BertModel, ids: torch.Tensor, args: argparse.Namespace) -> list[tuple]:
    """(batch, dense ms, pruned ms, pruned/dense, speed-up) per batch size, the two models alternating
    (`prune_trainer.bench.time_samples`)."""
    rows = []
    for bs in args.batch_sizes:
        batch = {"input_ids": ids[:bs], "attention_mask": torch.ones_like(ids[:bs])}
        md, mp = (statistics.median(t) for t in time_samples([dense, pruned], batch, args.rounds, args.reps))
        rows.append((bs, md * 1e3, mp * 1e3, mp / md, md / mp))
        print(f"batch {bs:3d}: dense {md * 1e3:9.2f} ms  pruned {mp * 1e3:9.2f} ms  "
              f"pruned/dense {mp / md:.3f}  speed-up {md / mp:.2f}x", flush=True)
    return rows


def main() -> None:
    args = _parse_args()
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30522, (max(args.batch_sizes), args.seq_len), generator=g)
    torch.manual_seed(0)
    dense = BertModel(minilm_config()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        pruned, diff = pruned_copy(0, args.target, {"input_ids": ids[:2]}, Path(tmp))
    sizes = pruned.config.prune_trainer_structure
    rows = _time_rows(dense, pruned, ids, args)

    lines = [
        f"# Structured pruning: inference latency, dense vs {args.target:.0%} of heads and FFN neurons removed",
        "",
        f"MiniLM-shaped `BertModel` (random weights): 6 layers × 384 hidden, 12 heads, 1536 FFN; pruned: heads per "
        f"layer {sizes['heads']}, FFN neurons per layer {sizes['ffn']} (magnitude, per layer, exported with "
        "`export_structured_model` and reloaded with `load_pruned_model`).",
        f"Parameters outside the embeddings (encoder and pooler): dense {params(dense):,}, pruned {params(pruned):,} "
        f"({params(pruned) / params(dense):.3f}). Max |Δ| pruned vs masked output: {diff:.2e}.",
        "",
        f"Sequence length {args.seq_len}, `torch.inference_mode`, torch {torch.__version__}, {args.threads} threads; "
        f"median of {args.rounds} rounds × {args.reps} forwards per model, the two models alternating.",
        f"Machine: {args.machine}.",
        "",
        "| batch | dense (ms) | pruned (ms) | pruned / dense | speed-up |",
        "|---|---|---|---|---|",
        *(f"| {bs} | {d:.2f} | {p:.2f} | {r:.3f} | {s:.2f}× |" for bs, d, p, r, s in rows),
        "",
    ]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    cmd = "python benchmarks/bench_structured.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k not in ("out", "machine") and v is not None
    )
    lines += [f"Command: `{cmd}`  ", f"git commit: `{commit}`", ""]
    if args.out:
        atomic_write_text(args.out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
