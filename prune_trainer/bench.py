"""Inference latency of a model against a baseline, timed side by side in one process (`prune-trainer bench`).

For every setting (threads × mode × batch size) the two models run the same random batch (sequence length
``seq_len``), alternating round by round so that machine noise hits both alike; the median forward time of each
and the ratio ``speedup = baseline / model`` are reported, with throughput (sequences/s), parameter counts and
weight-file sizes. Models exported by `export_structured_model` load through `load_pruned_model`; others through
the class named in their ``config.architectures`` (safetensors only, no code from the checkpoint).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODES = ("eager", "compile")


def load_for_bench(path: str | os.PathLike, weights: bool = True) -> nn.Module:
    """The model in ``path`` in eval mode: sliced structured exports via `load_pruned_model`, others via the
    class of ``config.architectures`` (``use_safetensors=True``). ``weights=False`` builds the same architecture
    from ``config.json`` alone with the class's random init: the latency of dense kernels does not depend on the
    weights' values, so a folder holding only the config of an export times like the export."""
    import transformers

    from prune_trainer.export.structured import STRUCTURE_FIELD, _model_class, build_pruned_model, load_pruned_model

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    structured = isinstance(getattr(config, STRUCTURE_FIELD, None), dict)
    if not weights:
        model = build_pruned_model(path, init_weights=True) if structured else _model_class(config)(config)
        return model.eval()
    if structured:
        return load_pruned_model(path)
    return _model_class(config).from_pretrained(path, use_safetensors=True).eval()


def weights_mib(path: str | os.PathLike) -> float:
    """Size of the weight files (``*.safetensors``, ``*.bin``) in ``path``, MiB."""
    files = [f for f in Path(path).iterdir() if f.suffix in (".safetensors", ".bin")]
    return round(sum(f.stat().st_size for f in files) / 2**20, 3)


def time_samples(models: list[Any], batch: dict[str, torch.Tensor], rounds: int, reps: int) -> list[list[float]]:
    """Seconds of every forward of every model, the models alternating round by round (after one warm-up each):
    machine noise hits all of them alike."""
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for model in models:
            model(**batch)
        for _ in range(rounds):
            for i, model in enumerate(models):
                for _ in range(reps):
                    t0 = time.perf_counter()
                    model(**batch)
                    times[i].append(time.perf_counter() - t0)
    return times


def _time_pair(models: list[nn.Module], batch: dict[str, torch.Tensor], rounds: int, reps: int) -> list[float]:
    """Median seconds per forward of each model (`time_samples`)."""
    return [statistics.median(t) for t in time_samples(models, batch, rounds, reps)]


def _check_bench_args(modes: tuple[str, ...], batch_sizes: tuple[int, ...], threads: tuple[int, ...],
                      counts: tuple[int, ...]) -> None:
    """Raise ValueError for an unknown mode or a non-positive batch size, thread count, round or length."""
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"bench: unknown mode {bad[0]!r}; allowed: {list(MODES)}")
    for name, values in (("batch size", batch_sizes), ("threads", threads), ("rounds", counts)):
        if not values or min(values) < 1:
            raise ValueError(f"bench: {name} must be positive integers, got {list(values)}")


def bench_models(
    model_dir: str | os.PathLike,
    baseline_dir: str | os.PathLike | None = None,
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    seq_len: int = 128,
    threads: tuple[int, ...] = (1, 2),
    modes: tuple[str, ...] = MODES,
    rounds: int = 5,
    reps: int = 3,
    progress: bool = True,
    weights: bool = True,
) -> dict[str, Any]:
    """Time ``model_dir`` (and ``baseline_dir``) for every (threads, mode, batch); return a JSON-able report.
    ``weights=False``: time the architectures of both folders (`load_for_bench`), not their weight files; the
    report says so (``weights``) and then has no file sizes. The report records the machine's load average before
    and after (``loadavg``): other work on the cores slows both models, and the ratio less than the times.

    Raises:
        ValueError: an unknown mode, or non-positive sizes/threads/rounds (before any model is loaded).
    """
    from tqdm.auto import tqdm

    _check_bench_args(modes, batch_sizes, threads, (rounds, reps, seq_len))
    dirs = {"model": Path(model_dir)} | ({"baseline": Path(baseline_dir)} if baseline_dir else {})
    loaded = {k: load_for_bench(p, weights) for k, p in dirs.items()}
    vocab = min(getattr(m.config, "vocab_size", 1000) for m in loaded.values())
    ids = torch.randint(0, vocab, (max(batch_sizes), seq_len), generator=torch.Generator().manual_seed(0))
    report: dict[str, Any] = {
        "seq_len": seq_len, "rounds": rounds, "reps": reps, "torch": torch.__version__, "settings": [],
        **{f"{k}_dir": str(p) for k, p in dirs.items()},
        **{f"{k}_params": sum(p.numel() for p in m.parameters()) for k, m in loaded.items()},
        **({f"{k}_mib": weights_mib(p) for k, p in dirs.items()} if weights else {}),
        "weights": "loaded" if weights else "random init (architecture from config.json)",
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    grid = [(t, m, b) for t in threads for m in modes for b in batch_sizes]
    previous_threads = torch.get_num_threads()
    compiled: dict[str, list[nn.Module]] = {}
    try:
        for n_threads, mode, batch_size in tqdm(grid, desc="bench", disable=not progress):
            torch.set_num_threads(n_threads)
            if mode not in compiled:
                compiled[mode] = [torch.compile(m) if mode == "compile" else m for m in loaded.values()]
            batch = {"input_ids": ids[:batch_size], "attention_mask": torch.ones_like(ids[:batch_size])}
            medians = _time_pair(compiled[mode], batch, rounds, reps)
            row: dict[str, Any] = {"threads": n_threads, "mode": mode, "batch_size": batch_size}
            for key, sec in zip(loaded, medians):
                row[f"{key}_ms"] = round(sec * 1000, 3)
                row[f"{key}_seq_per_s"] = round(batch_size / sec, 2)
            if "baseline" in loaded:
                row["speedup"] = round(medians[1] / medians[0], 3)
            report["settings"].append(row)
    finally:
        torch.set_num_threads(previous_threads)
    report["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return report


def speedup_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The run metrics of a `bench_models` report against a baseline: ``speedup_cpu_b<batch>`` of its first
    (threads, mode) setting, the baseline's size, and the whole report under ``bench``."""
    first = report["settings"][0]
    rows = [r for r in report["settings"] if (r["threads"], r["mode"]) == (first["threads"], first["mode"])]
    return {
        **{f"speedup_cpu_b{r['batch_size']}": r["speedup"] for r in rows},
        "baseline_params": report["baseline_params"],
        **({"baseline_mib": report["baseline_mib"]} if "baseline_mib" in report else {}),
        "bench": report,
    }


def format_report(report: dict[str, Any]) -> str:
    """A Markdown table of a `bench_models` report (ratios when there is a baseline)."""
    has_base = "baseline_dir" in report
    def size(key: str) -> str:
        mib = f", {report[key + '_mib']} MiB" if key + "_mib" in report else ""
        return f"{report[key + '_dir']} ({report[key + '_params']:,} params{mib})"

    lines = [f"model: {size('model')}"] + ([f"baseline: {size('baseline')}"] if has_base else [])
    lines += ["", "| threads | mode | batch | model (ms) |" + (" baseline (ms) | speed-up |" if has_base else ""),
              "|---|---|---|---|" + ("---|---|" if has_base else "")]
    for r in report["settings"]:
        line = f"| {r['threads']} | {r['mode']} | {r['batch_size']} | {r['model_ms']:.2f} |"
        if has_base:
            line += f" {r['baseline_ms']:.2f} | {r['speedup']:.2f}× |"
        lines.append(line)
    return "\n".join(lines)
