"""KFAC curvature of every target Linear: ``F ≈ G ⊗ A`` (Martens & Grosse 2015; used for pruning by
van der Ouderaa et al. 2024, "The LLM Surgeon", §3.1).

``A = E[ã ãᵀ]`` over the layer's inputs ``ã = [a; 1]`` (the constant 1 carries the bias: the weight matrix is
``[W | b]``), ``G = E[g gᵀ]`` over the gradients ``g = ∂ℓ/∂(Wa + b)`` of the per-token loss with respect to the
layer's outputs, both averaged over the calibration tokens (a batch's ``token_mask``, else its non-padding tokens).
The loss is the model's own cross-entropy per position, summed over the labelled positions: a token classifier's
tags, or a causal LM's next tokens (`next_token_labels`: ``labels[t] = input_ids[t+1]``, only positions with a
next token counted), with the data's labels (``"empirical"``) or labels drawn from the model's predictive
distribution at each position (``"sampled"``: the true Fisher). A forward hook adds ``ã ãᵀ``; a hook on the output
tensor adds ``g gᵀ`` in the backward pass.

Memory: ``(C+1)² + R²`` float64 numbers per Linear (``R × C`` weight). `plan_passes` groups the Linears into
calibration passes whose factors fit under a limit (one pass when all fit; one Linear per pass at worst), and a
Linear whose own factors exceed the limit is an error before any pass runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from prune_trainer.data.tokenize import IGNORE_INDEX

LabelMode = Literal["empirical", "sampled"]


@dataclass
class KroneckerFactors:
    """Running sums of one Linear's factors: ``a_sum = Σ ã ãᵀ`` ((C+1)² with a bias, else C²), ``g_sum = Σ g gᵀ``
    (R², or None when only ``A`` is collected, i.e. ``G = I``), over ``n`` tokens; ``rows = R``."""

    a_sum: torch.Tensor
    g_sum: torch.Tensor | None
    rows: int
    n: int = 0

    def _check(self) -> None:
        if self.n <= 0:
            raise ValueError("empty calibration data: the layer saw 0 calibration tokens")

    def a(self) -> torch.Tensor:
        """``A = Σ ã ãᵀ / n`` (float64)."""
        self._check()
        return self.a_sum / self.n

    def g(self) -> torch.Tensor:
        """``G = Σ g gᵀ / n`` (float64); the identity when only ``A`` was collected."""
        self._check()
        if self.g_sum is None:
            return torch.eye(self.rows, dtype=torch.float64, device=self.a_sum.device)
        return self.g_sum / self.n


def damped(matrix: torch.Tensor, fraction: float) -> torch.Tensor:
    """``M + λI`` with ``λ = fraction · mean(diag M)`` (van der Ouderaa et al. 2024, App. C.2; SparseGPT's rule).
    A matrix with zero diagonal gets ``λ = fraction`` (a dead layer stays invertible)."""
    if fraction < 0:
        raise ValueError(f"damping fraction must be >= 0, got {fraction}")
    out = matrix.clone()
    mean = float(torch.diagonal(out).mean())
    if not torch.isfinite(out).all() or mean < 0:
        raise ValueError(f"curvature factor is not finite or has a negative mean diagonal ({mean})")
    out.diagonal().add_(fraction * (mean if mean > 0 else 1.0))
    return out


def factor_bytes(linear: nn.Linear, with_g: bool = True) -> int:
    """Bytes of one Linear's float64 factors: ``8·((C+1)² + R²)``."""
    c = linear.in_features + (linear.bias is not None)
    return 8 * (c * c + (linear.out_features ** 2 if with_g else 0))


def plan_passes(sizes: dict[str, int], memory_limit: int) -> list[list[str]]:
    """Group Linears (name → factor bytes, in order) into passes whose factors fit under ``memory_limit`` bytes.

    Raises:
        ValueError: a Linear whose own factors exceed the limit (before any work), or a non-positive limit.
    """
    if memory_limit <= 0:
        raise ValueError(f"memory limit must be positive, got {memory_limit} bytes")
    too_big = {n: s for n, s in sizes.items() if s > memory_limit}
    if too_big:
        name, size = next(iter(too_big.items()))
        raise ValueError(
            f"KFAC factors of {name} need {size / 2**20:.1f} MiB, over the memory limit of "
            f"{memory_limit / 2**20:.1f} MiB ({len(too_big)} layer(s) too large); raise the limit"
        )
    passes: list[list[str]] = []
    used = memory_limit + 1
    for name, size in sizes.items():
        if used + size > memory_limit:
            passes.append([])
            used = 0
        passes[-1].append(name)
        used += size
    return passes


def _targets(logits: torch.Tensor, labels: torch.Tensor, mode: LabelMode, gen: torch.Generator) -> torch.Tensor:
    """The labels of the loss: the data's, or draws from ``softmax(logits)`` at the same labelled positions."""
    if mode == "empirical":
        return labels
    probs = torch.softmax(logits.detach().float(), -1).reshape(-1, logits.shape[-1])
    drawn = torch.multinomial(probs.cpu(), 1, generator=gen).view(labels.shape).to(labels.device)
    return torch.where(labels == IGNORE_INDEX, labels, drawn)


def _hooks(
    linears: dict[str, nn.Linear], factors: dict[str, KroneckerFactors], state: dict, with_g: bool
) -> list[torch.utils.hooks.RemovableHandle]:
    """Forward hooks adding ``ã ãᵀ`` and, on each output tensor, ``g gᵀ`` over the real tokens."""

    def make(name: str) -> Callable:
        def hook(module: nn.Linear, args: tuple, output: torch.Tensor) -> None:
            mask = state["mask"]
            a = args[0][mask].detach().double()
            if module.bias is not None:
                a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
            f = factors[name]
            f.a_sum += a.T @ a
            f.n += a.shape[0]
            if with_g and output.requires_grad:

                def add_g(grad: torch.Tensor) -> None:
                    g = grad[mask].double()
                    f.g_sum += g.T @ g

                output.register_hook(add_g)

        return hook

    return [lin.register_forward_hook(make(name)) for name, lin in linears.items()]


def collect_kfac(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    names: list[str],
    labels: LabelMode = "empirical",
    with_g: bool = True,
    seed: int = 0,
) -> dict[str, KroneckerFactors]:
    """KFAC factors of the Linears ``names`` from labelled calibration ``batches`` (``input_ids``,
    ``attention_mask``, ``labels`` aligned with the logits, optional ``token_mask``: the positions averaged over,
    default the attention mask; see module doc). ``with_g=False``: only ``A`` (no backward pass; ``G = I``)."""
    if not batches:
        raise ValueError("empty calibration data: no batches given")
    if labels not in ("empirical", "sampled"):
        raise ValueError(f"labels must be 'empirical' or 'sampled', got {labels!r}")
    device = next(model.parameters()).device
    linears = {n: model.get_submodule(n) for n in names}
    factors = {}
    for n, lin in linears.items():
        c = lin.in_features + (lin.bias is not None)
        g = torch.zeros(lin.out_features, lin.out_features, dtype=torch.float64, device=device) if with_g else None
        factors[n] = KroneckerFactors(torch.zeros(c, c, dtype=torch.float64, device=device), g, lin.out_features)
    state: dict = {}
    gen = torch.Generator().manual_seed(seed)
    weights = [lin.weight for lin in linears.values()]
    grad_flags = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)  # the outputs must be in the autograd graph; restored below
    handles = _hooks(linears, factors, state, with_g)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            target = batch.pop("labels")
            token_mask = batch.pop("token_mask", None)
            state["mask"] = (batch["attention_mask"] if token_mask is None else token_mask).bool()
            with torch.set_grad_enabled(with_g):
                logits = model(**batch).logits
                if with_g:
                    loss = nn.functional.cross_entropy(
                        logits.float().flatten(0, -2), _targets(logits, target, labels, gen).flatten(),
                        ignore_index=IGNORE_INDEX, reduction="sum",
                    )
                    torch.autograd.grad(loss, weights)  # fires the output hooks; leaves no .grad behind
    finally:
        for h in handles:
            h.remove()
        for w, flag in zip(weights, grad_flags, strict=True):
            w.requires_grad_(flag)
        model.train(was_training)
    return factors
