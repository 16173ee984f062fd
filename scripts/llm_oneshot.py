"""One-shot pruning of a Llama-family causal LM (default: the embedded SmolLM2-135M) judged by perplexity:
magnitude, Wanda, SparseGPT and OWL (Wanda with OWL's layer sparsities) at unstructured sparsities and N:M.

    PRUNE_TRAINER_CONLL_DIR=/work/shared/data/conll2003 nohup nice -n 10 python scripts/llm_oneshot.py \
        --out results/oneshot/smollm2 --settings 0.5,2:4,0.6,0.7 --methods sparsegpt,wanda,magnitude,owl &

Each finished row is appended to ``<out>/results.json`` (atomically); rows already there are skipped, so a
restart resumes. Calibration: ``--calib`` random windows of ``--seqlen`` tokens of the CoNLL-2003 training text
(SparseGPT's sampling). Perplexity: non-overlapping ``--seqlen`` windows of the CoNLL-2003 validation text, the
first ``--eval-windows`` of them.

The sequential runner here is self-contained and Llama-specific: the model's block list ``model.layers``, each
block replayed with its own keyword arguments (position embeddings, causal mask) recorded from a full forward
with ``use_cache=False``, so no key/value cache grows between blocks; every block is pruned from the statistics
of its inputs as produced by the already-pruned blocks before it (SparseGPT / Wanda reference pipeline).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prune_trainer.data.text import calibration_windows, load_text, tokenize_text
from prune_trainer.io import atomic_write_json
from prune_trainer.llm.models import EMBEDDED_LLM, load_causal_lm
from prune_trainer.llm.perplexity import perplexity
from prune_trainer.masking.selection import parse_pattern
from prune_trainer.oneshot.base import LayerStats
from prune_trainer.oneshot.owl import outlier_ratio, owl_sparsities
from prune_trainer.oneshot.registry import get_method
from prune_trainer.oneshot.wanda import wanda_scores

OWL_M, OWL_LAMBDA = 5.0, 0.08  # Yin et al. 2024, §4 (LLaMA settings)


class _Stop(Exception):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama-family causal LM (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder block list model.layers (not a Llama-family LM)")
    return layers


@torch.no_grad()
def capture_inputs(model: nn.Module, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[dict]]:
    """First block's hidden states per batch, and every block's own keyword arguments, recorded in a full
    forward of the first batch (``use_cache=False``: no cache among them). All batches must share one shape."""
    layers = decoder_layers(model)
    if any(b.shape != batches[0].shape for b in batches):
        raise ValueError("calibration batches must share one shape (their block arguments are recorded once)")
    hiddens: list[torch.Tensor] = []
    layer_kwargs: list[dict[str, Any]] = [{} for _ in layers]
    stop = {"at_first": False}

    def make_hook(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if i == 0:
                hiddens.append(args[0] if args else kwargs["hidden_states"])
            if len(args) > 1:
                raise ValueError(f"block {i} got {len(args)} positional arguments; only hidden states are replayed")
            layer_kwargs[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if i == 0 and stop["at_first"]:
                raise _Stop

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for j, batch in enumerate(batches):
            stop["at_first"] = j > 0
            try:
                model(input_ids=batch, use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    if any(kw.get("past_key_values") is not None or kw.get("past_key_value") is not None for kw in layer_kwargs):
        raise RuntimeError("a block received a key/value cache although use_cache=False")
    return hiddens, layer_kwargs


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def block_stats(
    block: nn.Module, hiddens: list[torch.Tensor], kwargs: dict, full: bool
) -> tuple[dict[str, LayerStats], list[torch.Tensor]]:
    """Input statistics of every Linear of ``block`` over all calibration tokens, and the block's outputs."""
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    stats = {n: LayerStats.empty(m.in_features, full, m.weight.device) for n, m in linears.items()}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: stats[n].add(a[0])) for n, m in linears.items()]
    try:
        outs = [run_block(block, h, kwargs) for h in hiddens]
    finally:
        for h in handles:
            h.remove()
    return stats, outs


@torch.no_grad()
def prune_llm_sequential(
    model: nn.Module, calib: torch.Tensor, method: str, sparsity: float | dict[int, float], prunen: int = 0,
    prunem: int = 0, batch_size: int = 8, **method_kwargs: Any,
) -> dict[str, Any]:
    """Prune every Linear of every decoder block in place, block by block (module doc); ``sparsity`` per
    block index for OWL. Returns timings and the per-Linear sparsity."""
    start, pruner = time.perf_counter(), get_method(method)
    layers, report = decoder_layers(model), {"layer_sparsity": {}, "solve_time_s": 0.0}
    hiddens, layer_kwargs = capture_inputs(model, _batches(calib, batch_size)) if pruner.needs_calibration else ([], [])
    for i, block in enumerate(layers):
        s = sparsity[i] if isinstance(sparsity, dict) else sparsity
        if pruner.needs_calibration:
            stats, _ = block_stats(block, hiddens, layer_kwargs[i], pruner.needs_hessian)
        t0 = time.perf_counter()
        for name, lin in block.named_modules():
            if isinstance(lin, nn.Linear):
                st = stats[name] if pruner.needs_calibration else None
                new_weight, keep = pruner.prune(lin.weight.data, st, s, prunen, prunem, **method_kwargs)
                lin.weight.data.copy_(new_weight * keep)
                report["layer_sparsity"][f"model.layers.{i}.{name}"] = float(1.0 - keep.float().mean())
        report["solve_time_s"] += time.perf_counter() - t0
        if pruner.needs_calibration:
            hiddens = [run_block(block, h, layer_kwargs[i]) for h in hiddens]
    report["total_time_s"] = time.perf_counter() - start
    return report


@torch.no_grad()
def owl_block_sparsities(
    model: nn.Module, calib: torch.Tensor, sparsity: float, batch_size: int = 8, m: float = OWL_M,
    lam: float = OWL_LAMBDA,
) -> tuple[dict[int, float], dict[int, float]]:
    """OWL (Yin et al. 2024, eq. 3–4): per block ``D_l = P(A > M·mean A)`` over the Wanda scores ``A`` of all its
    Linears on the dense model, ``S_l = clip(α(1 − D_l), S ± λ)`` with the parameter-weighted mean ``S``."""
    hiddens, layer_kwargs = capture_inputs(model, _batches(calib, batch_size))
    ratios, sizes = {}, {}
    for i, block in enumerate(decoder_layers(model)):
        stats, hiddens = block_stats(block, hiddens, layer_kwargs[i], full=False)
        scores = [wanda_scores(block.get_submodule(n).weight.data, st.col_norm()).flatten() for n, st in stats.items()]
        ratios[i], sizes[i] = outlier_ratio(torch.cat(scores), m), sum(s.numel() for s in scores)
    return owl_sparsities(ratios, sizes, sparsity, lam), ratios


def _batches(calib: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if calib.shape[0] % batch_size:
        raise ValueError(f"calibration count {calib.shape[0]} is not a multiple of the batch size {batch_size}")
    return list(calib.split(batch_size))


def measured_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over the weights of every Linear in the decoder blocks."""
    weights = [m.weight for m in decoder_layers(model).modules() if isinstance(m, nn.Linear)]
    return float(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))


def row_key(method: str, setting: str, calib: int, eval_windows: int | None) -> str:
    """A row's key in ``results.json``: ``method|setting|allocation|n<calib>|w<eval windows>`` as the study's
    one-shot grids (``dense|w<eval windows>`` for the dense row, which needs no calibration)."""
    if method == "dense":
        return f"dense|w{eval_windows}"
    return f"{method}|{setting}|{'owl' if method == 'owl' else 'uniform'}|n{calib}|w{eval_windows}"


def parse_setting(setting: str) -> tuple[float, str, int, int]:
    """``"0.5"`` → unstructured 50%; ``"2:4"`` → N:M (sparsity 1 − N/M)."""
    nm = parse_pattern(setting) if ":" in setting else None
    if nm:
        return 1.0 - nm[0] / nm[1], setting, nm[0], nm[1]
    return float(setting), "unstructured", 0, 0


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


def evaluate_row(model: nn.Module, eval_ids: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    r = perplexity(model, eval_ids, args.seqlen, batch_size=args.eval_batch_size, max_windows=args.eval_windows)
    return {"perplexity": round(r.perplexity, 4), "nll": round(r.nll, 6), "eval_tokens": r.n_tokens,
            "eval_windows": r.n_windows, "eval_time_s": round(r.time_s, 1)}


def prune_row(model: nn.Module, calib: torch.Tensor, method: str, setting: str, args) -> dict[str, Any]:
    sparsity, pattern, n, m = parse_setting(setting)
    out: dict[str, Any] = {"sparsity": sparsity, "pattern": pattern}
    if method == "dense":
        return {**out, "sparsity": 0.0, "pattern": "dense", "prune_time_s": 0.0}
    start = time.perf_counter()
    target: float | dict[int, float] = sparsity
    if method == "owl":
        if n:
            raise ValueError("OWL allocates unstructured sparsity; it does not combine with N:M")
        target, ratios = owl_block_sparsities(model, calib, sparsity, args.batch_size)
        out["owl"] = {"m": OWL_M, "lambda": OWL_LAMBDA, "outlier_ratio": ratios, "block_sparsity": target}
    report = prune_llm_sequential(model, calib, "wanda" if method == "owl" else method, target, n, m,
                                  args.batch_size)
    out.update(prune_time_s=round(time.perf_counter() - start, 2), solve_time_s=round(report["solve_time_s"], 2))
    return out


def load_rows(path: Path) -> dict[str, dict[str, Any]]:
    """The finished rows by key (`row_key`); a list of rows (the first format) is keyed on load."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    if isinstance(data, list):
        data = {row_key(r["method"], r["setting"], r["calib_samples"], r.get("max_eval_windows", r["eval_windows"])): r
                for r in data}
    return data


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table, with each perplexity's ratio to the dense row's."""
    dense = next((r["perplexity"] for r in rows if r["method"] == "dense"), None)
    lines = ["| method | pattern | target sparsity | measured sparsity | calibration windows | perplexity | × dense | "
             "prune time (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['perplexity'] / dense:.2f}" if dense else "–"
        calib = "–" if r["method"] in ("dense", "magnitude") else r["calib_samples"]
        lines.append(f"| {r['method']} | {r['pattern']} | {r['sparsity']:.0%} | {r['measured_sparsity']:.1%} | "
                     f"{calib} | {r['perplexity']:.2f} | {ratio} | {r['prune_time_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table:
        print(markdown_table(list(load_rows(Path(args.out) / "results.json").values())))
        return
    torch.manual_seed(0)
    out_path = Path(args.out) / "results.json"
    rows = load_rows(out_path)
    model, tokenizer = load_causal_lm(args.model)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = calibration_windows(tokenizer, args.calib, args.seqlen, args.calib_source, seed=args.seed)
    eval_ids = tokenize_text(load_text(args.eval_source), tokenizer)
    plan = [("dense", "0")] + [(m, s) for s in args.settings.split(",") for m in args.methods.split(",")
                                if not (m == "owl" and ":" in s)]
    for method, setting in plan:
        key = row_key(method, setting, args.calib, args.eval_windows)
        if key in rows:
            print(f"skip {method} {setting}: already in {out_path}", flush=True)
            continue
        model.load_state_dict(dense_state)
        row = {"model": args.model, "method": method, "setting": setting}
        row.update(prune_row(model, calib, method, setting, args))
        row["measured_sparsity"] = round(measured_sparsity(model), 6)
        row.update(evaluate_row(model, eval_ids, args))
        row.update(_provenance(args))
        rows[key] = row
        atomic_write_json(out_path, rows)
        print(json.dumps({k: row[k] for k in ("method", "setting", "perplexity", "prune_time_s")}), flush=True)


def _provenance(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "calib_samples": args.calib, "max_eval_windows": args.eval_windows, "seqlen": args.seqlen,
        "calib_source": args.calib_source,
        "eval_source": args.eval_source, "seed": args.seed, "git_commit": git_commit(),
        "device": f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} cores, shared)",
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=EMBEDDED_LLM)
    p.add_argument("--out", required=True)
    p.add_argument("--methods", default="sparsegpt,wanda,magnitude,owl")
    p.add_argument("--settings", default="0.5,2:4,0.6,0.7")
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=None)
    p.add_argument("--eval-batch-size", type=int, default=1)
    p.add_argument("--calib-source", default="conll-train")
    p.add_argument("--eval-source", default="conll-validation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table", action="store_true", help="print <out>/results.json as a Markdown table and exit")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
