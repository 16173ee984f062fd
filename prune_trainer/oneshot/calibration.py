"""Sequential block-by-block calibration and pruning (the SparseGPT / Wanda reference pipeline) for every supported
family: for each transformer block, in forward order over all stacks (an encoder-decoder's encoder, then its
decoder), collect the inputs of its target Linears with hooks over the calibration batches (padding tokens excluded),
prune them, and feed the block's outputs (recomputed after pruning, or the dense ones) to the next block. Each block
is re-run with its own captured arguments and never with a KV cache (`prune_trainer.oneshot.blocks`).

GPT-2's `Conv1D` stores its weight ``[in, out]``: the pruners take and return ``[out, in]`` (`weight_out_in`)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prune_trainer.data.conll import Sentence
from prune_trainer.masking.inject import DEFAULT_EXCLUDE, find_target_linears
from prune_trainer.oneshot.base import LayerStats
from prune_trainer.oneshot.blocks import (
    StackInputs,
    block_stacks,
    capture_stack_inputs,
    move,
    run_block,
    token_rows,
)
from prune_trainer.oneshot.owl import outlier_ratio
from prune_trainer.oneshot.registry import OneShotMethod
from prune_trainer.oneshot.wanda import wanda_scores


@dataclass
class PruneReport:
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    solve_time_s: float = 0.0
    total_time_s: float = 0.0
    n_tokens: int = 0


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (a view): ``weight`` of a Linear, ``weightᵀ`` of a `Conv1D`."""
    return module.weight.data if isinstance(module, nn.Linear) else module.weight.data.t()


def set_weight_out_in(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an ``[out, in]`` weight back into the module's own layout."""
    weight_out_in(module).copy_(weight)


def calibration_batches(
    sentences: list[Sentence],
    tokenizer: Any,
    n_samples: int,
    batch_size: int = 32,
    max_length: int = 128,
    seed: int = 0,
    split_words: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """``n_samples`` sentences drawn without replacement (seeded) and tokenized into padded batches: as words
    (``split_words``, as a tagger is trained) or as the text of the words joined by spaces (other tasks).

    Padding does not change the statistics (padding tokens are excluded, attention masks them)."""
    if not sentences:
        raise ValueError("empty calibration data: no sentences given")
    if not isinstance(n_samples, int) or n_samples <= 0:
        raise ValueError(f"calibration sample count must be a positive integer, got {n_samples!r}")
    if n_samples > len(sentences):
        raise ValueError(f"asked for {n_samples} calibration sentences but the split has only {len(sentences)}")
    if batch_size <= 0:
        raise ValueError(f"calibration batch size must be positive, got {batch_size}")
    chosen = _calibration_sample(sentences, n_samples, seed)
    batches = []
    for i in range(0, n_samples, batch_size):
        words = [sentences[j].tokens for j in chosen[i : i + batch_size]]
        text = words if split_words else [" ".join(w) for w in words]
        enc = tokenizer(
            text, is_split_into_words=split_words, truncation=True, max_length=max_length, padding=True,
            return_tensors="pt",
        )
        batches.append(dict(enc))
    return batches


def _calibration_sample(sentences: list[Sentence], n_samples: int, seed: int) -> list[int]:
    """Indices of ``n_samples`` sentences drawn without replacement (seeded), sorted by length: length-sorted
    batches have little padding and the same statistics."""
    chosen = random.Random(seed).sample(range(len(sentences)), n_samples)
    chosen.sort(key=lambda j: len(sentences[j].tokens))
    return chosen


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
    chosen = _calibration_sample(sentences, n_samples, seed)
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


def next_token_labels(batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Causal-LM calibration batches with the language model's own targets: ``labels[t] = input_ids[t+1]``
    (the next token; HF's shifted loss written per position), -100 where there is no real next token (the last
    position, padding), and ``token_mask``: the positions with a target, over which KFAC averages (`collect_kfac`).
    The next-token cross-entropy is the loss van der Ouderaa et al. (2024, App. B) prune OPT and Llama-2 with."""
    from prune_trainer.data.tokenize import IGNORE_INDEX

    out = []
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        has_next = torch.zeros_like(mask)
        has_next[:, :-1] = mask[:, :-1] & mask[:, 1:]
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, :-1] = ids[:, 1:]
        out.append({**batch, "labels": labels.masked_fill(~has_next, IGNORE_INDEX), "token_mask": has_next})
    return out


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (calibration batches and statistics go there)."""
    return next(model.parameters()).device


def _synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work so wall-clock timers measure it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


BlockVisit = Callable[[dict[str, nn.Module], dict[str, LayerStats]], bool]
"""``visit(target modules of one block by name, their input statistics) -> whether it changed their weights``."""


def targets_by_block(model: nn.Module, names: list[str]) -> list[list[dict[str, nn.Module]]]:
    """``[stack][block] -> {name: module}`` for the target modules; ValueError for a target outside every block."""
    stacks = block_stacks(model)
    out: list[list[dict[str, nn.Module]]] = [[{} for _ in blocks] for _, blocks in stacks]
    for name in names:
        for s, (prefix, _) in enumerate(stacks):
            if name.startswith(prefix + "."):
                out[s][int(name[len(prefix) + 1 :].split(".")[0])][name] = model.get_submodule(name)
                break
        else:
            raise ValueError(
                f"target {name!r} is outside the transformer blocks {[p for p, _ in stacks]}: sequential "
                "calibration prunes modules inside the blocks only"
            )
    return out


def _collect_block_stats(
    block: nn.Module, linears: dict[str, nn.Module], inputs: StackInputs, index: int, full: bool,
    device: torch.device,
) -> tuple[dict[str, LayerStats], list[torch.Tensor]]:
    """Run block ``index`` on every batch, accumulating each target's input statistics over the real tokens;
    return them and the block's outputs (CPU)."""
    stats = {n: LayerStats.empty(weight_out_in(m).shape[1], full, m.weight.device) for n, m in linears.items()}
    current: dict[str, Any] = {}

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            stats[name].add(token_rows(args[0], current["mask"], current["enc"], current["enc_mask"]))

        return hook

    handles = [lin.register_forward_pre_hook(make_hook(name)) for name, lin in linears.items()]
    outputs = []
    try:
        for b, hidden in enumerate(inputs.hidden):
            kwargs = move(inputs.kwargs[index][b], device)
            enc_mask = inputs.encoder_masks[b]
            current.update(mask=inputs.token_masks[b].to(device), enc=kwargs.get("encoder_hidden_states"),
                           enc_mask=None if enc_mask is None else enc_mask.to(device))
            outputs.append(run_block(block, hidden, kwargs, device))
    finally:
        for h in handles:
            h.remove()
    return stats, outputs


@torch.no_grad()
def walk_blocks(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], names: list[str], visit: BlockVisit, full: bool,
    pruned_inputs: bool = True, progress: bool = True, desc: str = "blocks",
) -> int:
    """Visit every block in forward order with the input statistics of its targets ``names`` (``full``: with
    ``X Xᵀ``); feed the next block the re-run outputs when ``visit`` changed weights and ``pruned_inputs``, else
    the dense ones. Returns the number of real calibration tokens (first stack); ValueError when there are none."""
    if not batches:
        raise ValueError("empty calibration data: no batches given")
    device = model_device(model)
    stacks = block_stacks(model)
    targets = targets_by_block(model, names)
    captured = {} if pruned_inputs else capture_stack_inputs(model, batches, list(range(len(stacks))))
    n_tokens = -1
    bar = tqdm(total=sum(len(blocks) for _, blocks in stacks), desc=desc, disable=not progress)
    for s, (prefix, blocks) in enumerate(stacks):
        inputs = captured[s] if s in captured else capture_stack_inputs(model, batches, [s])[s]
        if n_tokens < 0:
            n_tokens = sum(int(mask.sum()) for mask in inputs.token_masks)
            if n_tokens == 0:
                raise ValueError("empty calibration data: the calibration batches hold no real tokens")
        for i, block in enumerate(blocks):
            stats, outputs = _collect_block_stats(block, targets[s][i], inputs, i, full, device)
            if visit(targets[s][i], stats) and pruned_inputs:
                outputs = [run_block(block, h, inputs.kwargs[i][b], device) for b, h in enumerate(inputs.hidden)]
            inputs.hidden = outputs
            bar.update(1)
            bar.set_postfix(block=f"{prefix}.{i}")
    bar.close()
    return n_tokens


@torch.no_grad()
def prune_sequential(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    method: OneShotMethod,
    sparsity: float | dict[str, float],
    prunen: int = 0,
    prunem: int = 0,
    pruned_inputs: bool = True,
    targets: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
    progress: bool = True,
    **method_kwargs: Any,
) -> PruneReport:
    """Prune every target Linear of ``model`` in place, block by block (see module doc); ``targets=None``: the
    family preset (`resolve_targets`).

    ``sparsity``: one value, or a per-Linear dict (OWL). ``pruned_inputs``: feed each block the
    outputs of the already-pruned previous blocks (True, as SparseGPT/Wanda) or the dense ones.
    """
    device = model_device(model)
    _synchronize(device)
    start = time.perf_counter()
    model.eval()
    names = find_target_linears(model, targets, exclude)
    if isinstance(sparsity, dict):
        missing = sorted(set(names) - set(sparsity))
        if missing:
            raise ValueError(f"per-layer sparsity dict misses target layers {missing[:3]}...")
    if not method.needs_calibration:
        return _prune_without_data(model, names, method, sparsity, prunen, prunem, start, **method_kwargs)
    report = PruneReport()

    def visit(linears: dict[str, nn.Module], stats: dict[str, LayerStats]) -> bool:
        _synchronize(device)
        t0 = time.perf_counter()
        for name, lin in linears.items():
            s = sparsity[name] if isinstance(sparsity, dict) else sparsity
            new_weight, keep = method.prune(weight_out_in(lin), stats[name], s, prunen, prunem, **method_kwargs)
            set_weight_out_in(lin, new_weight * keep)
            report.layer_sparsity[name] = float(1.0 - keep.float().mean())
        _synchronize(device)
        report.solve_time_s += time.perf_counter() - t0
        return bool(linears)

    report.n_tokens = walk_blocks(model, batches, names, visit, method.needs_hessian, pruned_inputs, progress,
                                  f"{method.name} blocks")
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
        new_weight, keep = method.prune(weight_out_in(lin), None, s, prunen, prunem, **method_kwargs)
        set_weight_out_in(lin, new_weight * keep)
        report.layer_sparsity[name] = float(1.0 - keep.float().mean())
    report.solve_time_s = report.total_time_s = time.perf_counter() - start
    return report


@torch.no_grad()
def wanda_outlier_ratios(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    m: float = 1.0,
    targets: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
    progress: bool = False,
    per_block: bool = False,
) -> dict[str, float]:
    """OWL's ``D_l`` per target Linear from Wanda scores on the dense model (one pass over the blocks);
    ``per_block``: one ``D_l`` per transformer block, over the scores of all its targets together (Yin et al. 2024,
    §3: "layer" = block), given to each of them."""
    model.eval()
    names = find_target_linears(model, targets, exclude)
    ratios: dict[str, float] = {}

    def visit(linears: dict[str, nn.Module], stats: dict[str, LayerStats]) -> bool:
        scores = {n: wanda_scores(weight_out_in(lin), stats[n].col_norm()) for n, lin in linears.items()}
        if per_block and scores:
            block_ratio = outlier_ratio(torch.cat([s.flatten() for s in scores.values()]), m)
            ratios.update(dict.fromkeys(scores, block_ratio))
        else:
            ratios.update({n: outlier_ratio(s, m) for n, s in scores.items()})
        return False

    walk_blocks(model, batches, names, visit, full=False, pruned_inputs=False, progress=progress, desc="OWL ratios")
    return ratios
