"""Perplexity of a causal LM on a token sequence: ``PPL = exp(Σ_t NLL_t / T)`` over the scored tokens ``t``.

Two window protocols over the concatenated text (``ids``, one 1-D sequence):

* ``stride=None`` (or ``stride == seqlen``): non-overlapping windows of ``seqlen`` tokens, the incomplete tail
  dropped; every token but the first of each window is scored. This is the SparseGPT / Wanda evaluation
  (Frantar & Alistarh 2023, §5; Sun et al. 2024, §5): their ``exp(Σ_w seqlen·loss_w / (n·seqlen))`` equals ours
  because every window scores the same number of tokens.
* ``stride < seqlen``: sliding windows starting every ``stride`` tokens (the last one ends at the end of the
  text); each window scores only the tokens no earlier window scored, the overlapping context is labelled
  ``-100`` (the Hugging Face perplexity guide, "Perplexity of fixed-length models").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prune_trainer.data.conll import Sentence

MAX_LOGITS = 2**28
"""Most logits (float32: 1 GiB) one evaluation batch of the one-shot job holds (`evaluate_causal_lm`)."""


@dataclass(frozen=True)
class Window:
    """Tokens ``ids[begin:end]`` are fed; the targets at positions ``[score_from, end)`` are scored."""

    begin: int
    end: int
    score_from: int


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    n_tokens: int  # scored tokens
    n_windows: int
    seqlen: int
    stride: int
    time_s: float


def perplexity_windows(n_ids: int, seqlen: int, stride: int | None = None) -> list[Window]:
    """The windows of the protocol chosen by ``stride`` (module doc) over a sequence of ``n_ids`` tokens."""
    if seqlen < 2:
        raise ValueError(f"perplexity seqlen must be >= 2 (one context and one target token), got {seqlen}")
    stride = seqlen if stride is None else stride
    if not 0 < stride <= seqlen:
        raise ValueError(f"perplexity stride must be in [1, seqlen={seqlen}], got {stride}")
    if n_ids < seqlen:
        raise ValueError(f"the text has {n_ids} tokens, fewer than one window of seqlen={seqlen}")
    if stride == seqlen:
        return [Window(b, b + seqlen, b + 1) for b in range(0, n_ids - seqlen + 1, seqlen)]
    windows, prev_end = [], 0
    for begin in range(0, n_ids, stride):
        end = min(begin + seqlen, n_ids)
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_ids:
            break
    return windows


def evenly_spaced(windows: list[Window], max_windows: int | None) -> list[Window]:
    """At most ``max_windows`` of ``windows``, evenly spaced over the text: windows ``⌊i·n/k⌋``, ``i < k`` (all of
    them when ``max_windows`` is None or not smaller than ``n``)."""
    if max_windows is None or max_windows >= len(windows):
        return windows
    return [windows[i * len(windows) // max_windows] for i in range(max_windows)]


@torch.no_grad()
def token_nll(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``(batch, len−1)`` NLL of each next token: ``−log softmax(logits_{t−1})[x_t]`` (float32)."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
    return nll


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seqlen: int = 512,
    stride: int | None = None,
    batch_size: int = 1,
    max_windows: int | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on the 1-D token sequence ``ids`` (module doc). ``max_windows`` (a compute cap)
    scores only that many windows, evenly spaced over the text (windows ``⌊i·n/k⌋``, ``i < k``; the first one
    always included); ``n_tokens`` of the result states how many tokens were scored. Raises on a non-finite
    loss."""
    if ids.dim() != 1:
        raise ValueError(f"ids must be a 1-D token sequence, got shape {tuple(ids.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_windows is not None and max_windows <= 0:
        raise ValueError(f"max_windows must be positive or None, got {max_windows}")
    windows = evenly_spaced(perplexity_windows(ids.numel(), seqlen, stride), max_windows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start, total, count = time.perf_counter(), 0.0, 0
    try:
        for group in _batches(windows, batch_size):
            batch = torch.stack([ids[w.begin : w.end] for w in group]).to(device)
            nll = token_nll(model, batch)
            keep = _scored_mask(group, nll.shape[1], nll.device)
            total += float(nll[keep].double().sum())
            count += int(keep.sum())
    finally:
        model.train(was_training)
    return _result(total, count, len(windows), seqlen, stride, time.perf_counter() - start)


def _batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of equal length, at most ``batch_size`` per batch."""
    batches: list[list[Window]] = []
    for w in windows:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and last[0].end - last[0].begin == w.end - w.begin:
            last.append(w)
        else:
            batches.append([w])
    return batches


def _scored_mask(group: list[Window], n_targets: int, device: torch.device) -> torch.Tensor:
    """``(batch, n_targets)`` mask of the scored targets; target ``j`` of a window is token ``begin + j + 1``."""
    pos = torch.arange(1, n_targets + 1, device=device)[None, :]
    offset = torch.tensor([w.score_from - w.begin for w in group], device=device)[:, None]
    return pos >= offset


def _result(
    total: float, count: int, n_windows: int, seqlen: int, stride: int | None, time_s: float
) -> PerplexityResult:
    if count == 0:
        raise ValueError("perplexity scored 0 tokens")
    nll = total / count
    if not math.isfinite(nll):
        raise FloatingPointError(f"non-finite mean NLL {nll} over {count} tokens: the model outputs inf/nan")
    return PerplexityResult(math.exp(nll), nll, count, n_windows, seqlen, stride or seqlen, time_s)


def evaluate_causal_lm(model: nn.Module, tokenizer: Any, splits: dict[str, list[Sentence]], cfg: Any) -> dict[str, Any]:
    """The one-shot job's causal-LM evaluation (`TASK_EVALUATORS`): perplexity with non-overlapping windows of
    ``cfg.max_length`` tokens (at most the model's context) on ``cfg.eval_file`` (a text source of `load_text`) if
    given, else the CoNLL-2003 validation text; all windows, or ``cfg.eval_windows`` evenly spaced ones."""
    from prune_trainer.data.text import load_text, sentences_text, tokenize_text
    from prune_trainer.llm.models import context_length

    if cfg.eval_file:
        text = load_text(cfg.eval_file, getattr(cfg, "data_dir", None))
    else:
        text = sentences_text(splits["validation"])
    seqlen = min(cfg.max_length, context_length(model) or cfg.max_length)
    return perplexity_metrics(model, tokenize_text(text, tokenizer), seqlen, cfg.eval_batch_size,
                              getattr(cfg, "eval_windows", None))


def perplexity_metrics(
    model: nn.Module, ids: torch.Tensor, seqlen: int, eval_batch_size: int, max_windows: int | None = None
) -> dict[str, Any]:
    """`perplexity` over the non-overlapping ``seqlen`` windows of ``ids`` (``max_windows`` evenly spaced ones), in
    batches of at most ``eval_batch_size`` windows whose float32 logits stay ≤ 1 GiB; the ``eval_*`` metrics of a
    one-shot result or a recipe run."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 1)
    batch_size = max(1, min(eval_batch_size, MAX_LOGITS // (seqlen * vocab)))
    r = perplexity(model, ids, seqlen, batch_size=batch_size, max_windows=max_windows)
    return {"eval_perplexity": r.perplexity, "eval_nll": r.nll, "eval_tokens": r.n_tokens,
            "eval_windows": r.n_windows, "eval_seqlen": r.seqlen,
            "eval_batch_size": batch_size, "eval_time_s": round(r.time_s, 1)}
