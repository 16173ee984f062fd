"""Sequential layer-by-layer calibration and pruning of a BERT-style encoder (SparseGPT / Wanda
reference pipeline): capture the first block's inputs for the calibration batches, then for each
block collect the inputs of its Linears with hooks (padding tokens excluded), prune them, and feed
the block's outputs — recomputed after pruning, or the dense ones — to the next block."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prune_trainer.data.conll import Sentence
from prune_trainer.masking.inject import DEFAULT_EXCLUDE, DEFAULT_TARGETS, find_target_linears
from prune_trainer.oneshot.base import LayerStats
from prune_trainer.oneshot.owl import outlier_ratio
from prune_trainer.oneshot.registry import OneShotMethod
from prune_trainer.oneshot.wanda import wanda_scores

LAYER_LIST_RE = re.compile(r"(^|\.)(encoder|transformer)\.layers?$")


@dataclass
class CalibrationBatch:
    """Inputs of the current block for one batch: hidden states, the block's other arguments, and
    the ``(batch, seq)`` mask of real (non-padding) tokens."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]
    token_mask: torch.Tensor


@dataclass
class PruneReport:
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    solve_time_s: float = 0.0
    total_time_s: float = 0.0
    n_tokens: int = 0


class _StopForward(Exception):
    pass


def encoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The block list of a BERT-style encoder (``bert.encoder.layer`` or any ``...encoder.layer(s)``)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and LAYER_LIST_RE.search(name) and len(module) > 0:
            return name, module
    raise ValueError(f"{type(model).__name__} has no encoder block list named like '...encoder.layer'")


def calibration_batches(
    sentences: list[Sentence],
    tokenizer: Any,
    n_samples: int,
    batch_size: int = 32,
    max_length: int = 128,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """``n_samples`` sentences drawn without replacement (seeded) and tokenized into padded batches.

    Padding does not change the statistics (padding tokens are excluded, attention masks them)."""
    if not sentences:
        raise ValueError("empty calibration data: no sentences given")
    if not isinstance(n_samples, int) or n_samples <= 0:
        raise ValueError(f"calibration sample count must be a positive integer, got {n_samples!r}")
    if n_samples > len(sentences):
        raise ValueError(f"asked for {n_samples} calibration sentences but the split has only {len(sentences)}")
    if batch_size <= 0:
        raise ValueError(f"calibration batch size must be positive, got {batch_size}")
    chosen = random.Random(seed).sample(range(len(sentences)), n_samples)
    chosen.sort(key=lambda j: len(sentences[j].tokens))  # length-sorted batches: little padding, same stats
    batches = []
    for i in range(0, n_samples, batch_size):
        words = [sentences[j].tokens for j in chosen[i : i + batch_size]]
        enc = tokenizer(
            words, is_split_into_words=True, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        batches.append(dict(enc))
    return batches


def labelled_calibration_batches(
    sentences: list[Sentence],
    tokenizer: Any,
    n_samples: int,
    batch_size: int = 32,
    max_length: int = 128,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """The same ``n_samples`` sentences as `calibration_batches` (same seed, same length-sorted batches), with
    ``labels`` aligned to the first sub-token of each word (-100 elsewhere and on padding), for methods that
    back-propagate the model's loss (KFAC curvature)."""
    from transformers import DataCollatorForTokenClassification

    from prune_trainer.data.tokenize import tokenize_and_align

    batches = calibration_batches(sentences, tokenizer, n_samples, batch_size, max_length, seed)  # checks args
    chosen = random.Random(seed).sample(range(len(sentences)), n_samples)
    chosen.sort(key=lambda j: len(sentences[j].tokens))
    data = tokenize_and_align([sentences[j] for j in chosen], tokenizer, max_length)
    collate = DataCollatorForTokenClassification(tokenizer)
    out = []
    for start, batch in zip(range(0, n_samples, batch_size), batches, strict=True):
        rows = [data[i] for i in range(start, min(start + batch_size, n_samples))]
        labelled = dict(collate(rows))
        if labelled["input_ids"].shape != batch["input_ids"].shape:
            raise ValueError("labelled calibration batches do not match the unlabelled ones")
        out.append(labelled)
    return out


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (calibration batches and statistics go there)."""
    return next(model.parameters()).device


def _synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work so wall-clock timers measure it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[CalibrationBatch]:
    """Run the model up to its first encoder block and record that block's inputs per batch (on the
    model's device; the batches themselves may stay on the CPU)."""
    if not batches:
        raise ValueError("empty calibration data: no batches given")
    _, layers = encoder_layers(model)
    device = model_device(model)
    captured: list[CalibrationBatch] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(CalibrationBatch(hidden, tuple(args[1:]), dict(kwargs), torch.empty(0)))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            try:
                model(**batch)
            except _StopForward:
                pass
            captured[-1].token_mask = batch["attention_mask"].bool()
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, cb: CalibrationBatch) -> torch.Tensor:
    out = block(cb.hidden, *cb.args, **cb.kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _collect_block_stats(
    block: nn.Module, linears: dict[str, nn.Linear], inputs: list[CalibrationBatch], full: bool
) -> tuple[dict[str, LayerStats], list[torch.Tensor]]:
    """Accumulate each Linear's input statistics over the real tokens; return them and the block outputs."""
    stats = {name: LayerStats.empty(lin.in_features, full, lin.weight.device) for name, lin in linears.items()}
    current: dict[str, torch.Tensor] = {}

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            stats[name].add(args[0][current["mask"]])

        return hook

    handles = [lin.register_forward_pre_hook(make_hook(name)) for name, lin in linears.items()]
    outputs = []
    try:
        for cb in inputs:
            current["mask"] = cb.token_mask
            outputs.append(_run_block(block, cb))
    finally:
        for h in handles:
            h.remove()
    return stats, outputs


def _block_linears(model: nn.Module, prefix: str, index: int, names: list[str]) -> dict[str, nn.Linear]:
    start = f"{prefix}.{index}."
    return {n: model.get_submodule(n) for n in names if n.startswith(start)}


@torch.no_grad()
def prune_sequential(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    method: OneShotMethod,
    sparsity: float | dict[str, float],
    prunen: int = 0,
    prunem: int = 0,
    pruned_inputs: bool = True,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
    progress: bool = True,
    **method_kwargs: Any,
) -> PruneReport:
    """Prune every target Linear of ``model`` in place, block by block (see module doc).

    ``sparsity``: one value, or a per-Linear dict (OWL). ``pruned_inputs``: feed each block the
    outputs of the already-pruned previous blocks (True, as SparseGPT/Wanda) or the dense ones.
    """
    device = model_device(model)
    _synchronize(device)
    start = time.perf_counter()
    model.eval()
    prefix, layers = encoder_layers(model)
    names = find_target_linears(model, targets, exclude)
    if isinstance(sparsity, dict):
        missing = sorted(set(names) - set(sparsity))
        if missing:
            raise ValueError(f"per-layer sparsity dict misses target layers {missing[:3]}...")
    if not method.needs_calibration:
        return _prune_without_data(model, names, method, sparsity, prunen, prunem, start, **method_kwargs)
    inputs = capture_block_inputs(model, batches)
    report = PruneReport(n_tokens=int(sum(int(cb.token_mask.sum()) for cb in inputs)))
    if report.n_tokens == 0:
        raise ValueError("empty calibration data: the calibration batches hold no real tokens")
    bar = tqdm(range(len(layers)), desc=f"{method.name} blocks", disable=not progress)
    for i in bar:
        block = layers[i]
        linears = _block_linears(model, prefix, i, names)
        stats, dense_out = _collect_block_stats(block, linears, inputs, method.needs_hessian)
        _synchronize(device)
        t0 = time.perf_counter()
        for name, lin in linears.items():
            s = sparsity[name] if isinstance(sparsity, dict) else sparsity
            new_weight, keep = method.prune(lin.weight.data, stats[name], s, prunen, prunem, **method_kwargs)
            lin.weight.data.copy_(new_weight * keep)
            report.layer_sparsity[name] = float(1.0 - keep.float().mean())
        _synchronize(device)
        report.solve_time_s += time.perf_counter() - t0
        bar.set_postfix(block=i, solve_s=round(report.solve_time_s, 1))
        outs = [_run_block(block, cb) for cb in inputs] if pruned_inputs and linears else dense_out
        for cb, out in zip(inputs, outs, strict=True):
            cb.hidden = out
    _synchronize(device)
    report.total_time_s = time.perf_counter() - start
    return report


def _prune_without_data(
    model: nn.Module,
    names: list[str],
    method: OneShotMethod,
    sparsity: float | dict[str, float],
    prunen: int,
    prunem: int,
    start: float,
    **method_kwargs: Any,
) -> PruneReport:
    """Data-free methods (magnitude): prune each target Linear directly, no forward pass."""
    report = PruneReport()
    for name in names:
        lin = model.get_submodule(name)
        s = sparsity[name] if isinstance(sparsity, dict) else sparsity
        new_weight, keep = method.prune(lin.weight.data, None, s, prunen, prunem, **method_kwargs)
        lin.weight.data.copy_(new_weight * keep)
        report.layer_sparsity[name] = float(1.0 - keep.float().mean())
    report.solve_time_s = report.total_time_s = time.perf_counter() - start
    return report


@torch.no_grad()
def wanda_outlier_ratios(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    m: float = 1.0,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
) -> dict[str, float]:
    """OWL's ``D_l`` per target Linear from Wanda scores on the dense model (one forward pass)."""
    model.eval()
    prefix, layers = encoder_layers(model)
    names = find_target_linears(model, targets, exclude)
    inputs = capture_block_inputs(model, batches)
    ratios: dict[str, float] = {}
    for i, block in enumerate(layers):
        linears = _block_linears(model, prefix, i, names)
        stats, outs = _collect_block_stats(block, linears, inputs, full=False)
        for name, lin in linears.items():
            ratios[name] = outlier_ratio(wanda_scores(lin.weight.data, stats[name].col_norm()), m)
        for cb, out in zip(inputs, outs, strict=True):
            cb.hidden = out
    return ratios
