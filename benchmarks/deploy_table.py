"""Deployment table: file size, CPU latency (batch 1 and 32, side by side in one run) and validation F1 of pruned
models stored dense / compressed (bitmask, N:M) / INT8, run in PyTorch and in ONNX Runtime.

For every model (``--model label=path``, the first is the dense baseline) the script writes, under ``--work``
(outside the repository: weights are not committed):

- checkpoints: plain fp32 (``dense``), the model's sparse format in fp32 (``bitmask`` for unstructured sparsity,
  ``nm`` for N:M; structured models are small already: ``dense``), the same in INT8 with the word embeddings INT8
  per row, in INT8 with the word embeddings INT4 (groups of 128), in INT8 with the word embeddings as
  rank-``--embedding-rank`` SVD factors (INT8), and in INT8 with only the word-embedding rows of the training
  split's tokens (others load as [UNK]);
- ONNX graphs: fp32 (from the fp32 checkpoint) and ONNX Runtime dynamic INT8 (from the INT8 checkpoint).

Runtime variants (each row names its file and the variant it runs; formats that load into the same model share
their latency and F1, since loading is bit-identical): PyTorch fp32, PyTorch dynamic INT8 (``torch.ao``), ONNX
Runtime fp32 and dynamic INT8. All variants are timed in one process, alternating round by round on the same
random batch (``--seq-len`` tokens), ``--threads`` threads each; medians, and ratios to the dense PyTorch fp32
model. F1: entity F1 on the CoNLL-2003 validation split through each runtime (cached per variant in ``--work``,
so a rerun only times).

    nohup nice -n 10 python benchmarks/deploy_table.py --model dense=/work/scratch/dense/model \\
        --model obert_90=... --model nm_2_4=... --model structured_3x=... --out results/deploy &
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (as ONNX Runtime's pools are set here): on a loaded 2-core machine a
# spinning 2-thread torch pool waits for a descheduled partner and runs ~5× slower than one thread. Before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from prune_trainer.bench import time_samples  # noqa: E402
from prune_trainer.export.convert import convert_checkpoint, weight_file_mib  # noqa: E402
from prune_trainer.export.runtime import OrtTokenClassifier, export_onnx, quantize_onnx_int8, quantize_torch_dynamic  # noqa: E402
from prune_trainer.export.structured import STRUCTURE_FIELD, load_pruned_model  # noqa: E402
from prune_trainer.io import atomic_write_json, atomic_write_text  # noqa: E402

COLUMNS = ("model", "format", "quantize", "embeddings", "runtime", "file_mib", "compression_vs_dense",
           "latency_ms_b1", "latency_ms_b32", "speedup_b1", "speedup_b32", "eval_f1")


@dataclass
class Row:
    """One line of the table: a stored file and the runtime variant that runs it."""

    model: str
    format: str
    quantize: str
    embeddings: str
    runtime: str
    file: Path
    variant: str
    values: dict[str, Any] = field(default_factory=dict)


def sparse_format(src: Path) -> tuple[str, str | None]:
    """The model's compressed format: ``nm`` (N:M pattern in sparsity.json), ``dense`` (structured, or < 30% of
    zeros), else ``bitmask``; with the N:M pattern."""
    report = json.loads((src / "sparsity.json").read_text()) if (src / "sparsity.json").is_file() else {}
    config = json.loads((src / "config.json").read_text())
    pattern = report.get("pattern") or "unstructured"
    if ":" in pattern:
        return "nm", pattern
    if STRUCTURE_FIELD in config or report.get("global_sparsity", 0.0) < 0.3:
        return "dense", None
    return "bitmask", None


def _convert(src: Path, dst: Path, **kwargs: Any) -> Path:
    """`convert_checkpoint` unless ``dst`` is already complete (a rerun resumes)."""
    if not ((dst / "config.json").is_file() and (dst / "sparsity.json").is_file()):
        convert_checkpoint(src, dst, **kwargs)
    return dst


def build_files(label: str, src: Path, work: Path, rank: int, vocab: list[int]) -> tuple[list[Row], dict[str, Path]]:
    """Write the checkpoints and ONNX graphs of one model; return its rows and the file of each variant."""
    out = work / label
    fmt, pattern = sparse_format(src)
    emb = f"rank-{rank} SVD factors, INT8"
    fp32 = _convert(src, out / "dense", format="dense")
    rows = [Row(label, "dense", "none", "fp32", "pytorch", fp32, f"{label}/pt_fp32")]
    if fmt != "dense":
        packed = _convert(src, out / fmt, format=fmt, pattern=pattern)
        rows.append(Row(label, fmt, "none", "fp32", "pytorch", packed, f"{label}/pt_fp32"))
    int8 = _convert(src, out / f"{fmt}_int8", format=fmt, pattern=pattern, quantize="int8")
    low = _convert(src, out / f"{fmt}_int8_emb{rank}", format=fmt, pattern=pattern, quantize="int8",
                   embedding_rank=rank)
    trimmed = _convert(src, out / f"{fmt}_int8_vocab", format=fmt, pattern=pattern, quantize="int8",
                       embedding_rows=vocab)
    emb4 = _convert(src, out / f"{fmt}_int8_emb4", format=fmt, pattern=pattern, quantize="int8",
                    embedding_quant="int4")
    rows += [Row(label, fmt, "int8", "INT8 per row", "pytorch", int8, f"{label}/pt_int8"),
             Row(label, fmt, "int8", "INT4, groups of 128, fp16 scales", "pytorch", emb4, f"{label}/pt_int8_emb4"),
             Row(label, fmt, "int8", emb, "pytorch", low, f"{label}/pt_int8_emb"),
             Row(label, fmt, "int8", f"train-set rows only ({len(vocab)}), INT8", "pytorch", trimmed,
                 f"{label}/pt_int8_vocab")]
    onnx_fp32, onnx_int8 = out / "model.onnx", out / "model.int8.onnx"
    if not onnx_fp32.is_file():
        export_onnx(load_pruned_model(fp32), onnx_fp32)
    if not onnx_int8.is_file():
        tmp = export_onnx(load_pruned_model(int8), out / "int8_weights.onnx")
        quantize_onnx_int8(tmp, onnx_int8)
        tmp.unlink()
    rows += [Row(label, "onnx", "none", "fp32", "onnxruntime", onnx_fp32, f"{label}/ort_fp32"),
             Row(label, "onnx", "int8", "INT8 (ORT Gather)", "onnxruntime", onnx_int8, f"{label}/ort_int8")]
    files = {"pt_fp32": fp32, "pt_int8": int8, "pt_int8_emb4": emb4, "pt_int8_emb": low, "pt_int8_vocab": trimmed,
             "ort_fp32": onnx_fp32, "ort_int8": onnx_int8}
    return rows, {f"{label}/{k}": v for k, v in files.items()}


def train_vocabulary(src: Path, data_dir: str | None) -> list[int]:
    """Ids of the sub-tokens of the CoNLL-2003 training split (+ special tokens) under the model's tokenizer."""
    from transformers import AutoTokenizer

    from prune_trainer.data import load_conll_splits, used_token_ids

    return used_token_ids(load_conll_splits(data_dir)["train"], AutoTokenizer.from_pretrained(src))


def load_variant(key: str, path: Path, threads: int) -> Any:
    """The runnable model of a variant key (``<label>/<pt|ort>_<...>``)."""
    kind = key.split("/", 1)[1]
    if kind.startswith("ort"):
        return OrtTokenClassifier(path, threads, spinning=False)
    model = load_pruned_model(path)
    return quantize_torch_dynamic(model) if "int8" in kind else model


def evaluate_variants(variants: dict[str, Any], files: dict[str, Path], args: argparse.Namespace) -> dict[str, dict]:
    """Validation F1 and eval time of every variant, cached in ``<work>/eval_cache.json`` (key + file mtime)."""
    from transformers import AutoTokenizer

    from prune_trainer.data import load_conll_splits
    from prune_trainer.oneshot.evaluation import evaluate_f1

    cache_file = Path(args.work) / "eval_cache.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    sentences = load_conll_splits(args.data_dir)["validation"]
    if args.eval_sentences:
        sentences = sentences[: args.eval_sentences]
    for key, model in variants.items():
        if key.split("/")[0] in args.no_eval:
            continue
        stamp = f"{files[key]}:{files[key].stat().st_mtime_ns}:{len(sentences)}"
        if cache.get(key, {}).get("stamp") != stamp:
            tok_dir = files[key.split("/")[0] + "/pt_fp32"]
            t0 = time.perf_counter()
            scores = evaluate_f1(model, AutoTokenizer.from_pretrained(tok_dir), sentences, batch_size=64)
            cache[key] = {"stamp": stamp, "f1": scores["f1"], "eval_s": round(time.perf_counter() - t0, 1)}
            atomic_write_json(cache_file, cache)
            print(f"eval {key}: F1 {scores['f1']:.4f} ({cache[key]['eval_s']} s)", flush=True)
    return cache


def timing_key(variant: str) -> str:
    """The variant whose forward a variant shares: the INT8 embedding variants load into the same INT8 model as
    ``pt_int8`` (the word embeddings are decoded into a full fp32 table), so only ``pt_int8`` is timed."""
    label, kind = variant.split("/", 1)
    return f"{label}/pt_int8" if kind.startswith("pt_int8") else variant


def time_variants(variants: dict[str, Any], args: argparse.Namespace) -> dict[str, dict[int, dict[str, float]]]:
    """Median and minimum ms per forward of every distinct variant at each batch size, all alternating in one
    run. The median is the table's latency (as `prune-trainer bench`); the minimum is kept in the JSON."""
    timed = {k: m for k, m in variants.items() if timing_key(k) == k}
    ids = torch.randint(0, 1000, (max(args.batch_sizes), args.seq_len), generator=torch.Generator().manual_seed(0))
    if len(args.reps) not in (1, len(args.batch_sizes)):
        raise ValueError(f"--reps: one value or one per batch size ({args.batch_sizes}), got {args.reps}")
    reps = dict(zip(args.batch_sizes, args.reps * len(args.batch_sizes) if len(args.reps) == 1 else args.reps))
    out: dict[str, dict[int, dict[str, float]]] = {k: {} for k in timed}
    for batch_size in args.batch_sizes:
        batch = {"input_ids": ids[:batch_size], "attention_mask": torch.ones_like(ids[:batch_size])}
        t0 = time.perf_counter()
        samples = time_samples(list(timed.values()), batch, args.rounds, reps[batch_size])
        for key, sec in zip(timed, samples):
            out[key][batch_size] = {"min": round(min(sec) * 1000, 2), "median": round(statistics.median(sec) * 1000, 2)}
        print(f"timed batch {batch_size} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def fill_rows(rows: list[Row], medians: dict, evals: dict, baseline: str) -> list[dict[str, Any]]:
    """The table's rows (the `COLUMNS`), ratios against the baseline model's PyTorch fp32 variant."""
    dense_mib = weight_file_mib(rows[0].file)
    base = {b: t["median"] for b, t in medians[f"{baseline}/pt_fp32"].items()}
    out = []
    for row in rows:
        mib = weight_file_mib(row.file)
        timing = medians[timing_key(row.variant)]
        lat = {b: t["median"] for b, t in timing.items()}
        out.append({
            "model": row.model, "format": row.format, "quantize": row.quantize, "embeddings": row.embeddings,
            "runtime": row.runtime, "file_mib": round(mib, 2), "compression_vs_dense": round(dense_mib / mib, 2),
            "latency_ms_b1": lat.get(1), "latency_ms_b32": lat.get(32),
            "speedup_b1": round(base[1] / lat[1], 2) if 1 in lat else None,
            "speedup_b32": round(base[32] / lat[32], 2) if 32 in lat else None,
            "eval_f1": round(evals[row.variant]["f1"], 4) if row.variant in evals else None,
            "latency_min_ms": {str(b): t["min"] for b, t in timing.items()},
            "timed_as": timing_key(row.variant), "variant": row.variant, "file": str(row.file),
        })
    return out


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The table as Markdown, with the settings it was measured under."""
    cols = [c for c in COLUMNS if c != "model"]
    lines = [f"Measured {meta['threads']} threads (OMP_WAIT_POLICY={meta['omp_wait_policy']}, ORT without spinning), "
             f"seq {meta['seq_len']}, batch sizes {meta['batch_sizes']}, {meta['rounds']} rounds × {meta['reps']} "
             f"forwards per variant (per batch size), all variants alternating in one run; latency = the median "
             f"(minimums in the JSON), INT8-embedding variants timed as their INT8 model; F1 on "
             f"{meta['eval_sentences']} validation sentences. Device: {meta['device']}. "
             f"Commit `{meta['git_commit']}`.", "",
             "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['model']} | " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", required=True, metavar="LABEL=PATH",
                   help="a model folder; repeat; the first is the dense baseline")
    p.add_argument("--work", default="/work/scratch/deploy", help="where checkpoints/ONNX files go (not in git)")
    p.add_argument("--out", default="results/deploy", help="folder for deploy_table.json/.md and deploy_run.json")
    p.add_argument("--data-dir", help="CoNLL-2003 directory (default: $PRUNE_TRAINER_CONLL_DIR)")
    p.add_argument("--embedding-rank", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, nargs="+", default=[3, 1],
                   help="forwards per variant per round: one value, or one per batch size (default 3 1)")
    p.add_argument("--eval-sentences", type=int, default=0, help="first N validation sentences (0: all)")
    p.add_argument("--no-eval", nargs="*", default=[], metavar="LABEL",
                   help="models timed and sized but not evaluated (F1 null), e.g. an untrained stand-in")
    p.add_argument("--eval-only", action="store_true", help="build files and fill the F1 cache; no timing, no table")
    return p.parse_args(argv)


def run_meta(args: argparse.Namespace, models: dict[str, str], evals: dict, files: dict, t_start: float
             ) -> dict[str, Any]:
    """What the table was measured with: commit, device, command, settings, versions, eval and wall times."""
    import onnxruntime

    from prune_trainer.devices import device_description
    from prune_trainer.provenance import git_commit

    return {
        "git_commit": git_commit(), "device": f"{device_description(torch.device('cpu'))} ({platform.machine()})",
        "command": " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "models": models, "threads": args.threads, "seq_len": args.seq_len, "rounds": args.rounds,
        "reps": args.reps, "batch_sizes": args.batch_sizes, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "eval_sentences": args.eval_sentences or "all", "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__, "not_evaluated": args.no_eval,
        "eval_s": {k: v["eval_s"] for k, v in evals.items() if k in files},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    models = dict(item.split("=", 1) for item in args.model)
    rows: list[Row] = []
    files: dict[str, Path] = {}
    for label, src in models.items():
        vocab = train_vocabulary(Path(src), args.data_dir)
        model_rows, model_files = build_files(label, Path(src), Path(args.work), args.embedding_rank, vocab)
        rows += model_rows
        files.update(model_files)
        print(f"files of {label} ready", flush=True)
    variants = {key: load_variant(key, path, args.threads) for key, path in files.items()}
    evals = evaluate_variants(variants, files, args)
    evals = {k: v for k, v in evals.items() if k in files and k.split("/")[0] not in args.no_eval}
    if args.eval_only:
        return 0
    medians = time_variants(variants, args)
    table = fill_rows(rows, medians, evals, next(iter(models)))
    meta = run_meta(args, models, evals, files, t_start)
    out = Path(args.out)
    atomic_write_json(out / "deploy_table.json", table)
    atomic_write_json(out / "deploy_run.json", meta)
    atomic_write_text(out / "deploy_table.md", markdown(table, meta))
    print(markdown(table, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
