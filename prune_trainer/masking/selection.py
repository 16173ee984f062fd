"""Turn importance scores into 0/1 masks: per layer, global across layers, or N:M.

Every selector keeps the ``k = n - round(s·n)`` highest-scoring weights (exact count, ties broken
by `torch.topk`), so the reached sparsity equals the requested one up to rounding. Non-finite scores
(NaN, ±inf: e.g. the magnitude of a diverged weight) rank below every finite score, so a NaN or inf
weight is never kept in place of a finite one.
"""

from __future__ import annotations

import torch


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Validate a sparsity value: a float in [0, 1)."""
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def finite_scores(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` as float with NaN and ±inf replaced by -inf (ranked last by every selector)."""
    scores = scores.float()
    return scores.masked_fill(~torch.isfinite(scores), float("-inf"))


def num_pruned(numel: int, sparsity: float) -> int:
    """Number of weights to prune for a target sparsity: ``round(s · n)``."""
    return int(round(check_sparsity(sparsity) * numel))


def topk_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask keeping the ``n - round(s·n)`` largest entries of ``scores``."""
    flat = finite_scores(scores).reshape(-1)
    keep = flat.numel() - num_pruned(flat.numel(), sparsity)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if keep > 0:
        mask[torch.topk(flat, keep, sorted=False).indices] = True
    return mask.view_as(scores)


def global_topk_masks(
    scores: dict[str, torch.Tensor], sparsity: float, min_kept_fraction: float = 0.0
) -> dict[str, torch.Tensor]:
    """Masks keeping the globally largest scores across all layers (one threshold for the model).

    ``min_kept_fraction`` is a per-layer floor: each layer keeps at least that fraction of its
    weights (its own top entries) so that no layer is emptied; the floor's weights count toward
    the global budget.
    """
    check_sparsity(sparsity)
    names = list(scores)
    flats = [finite_scores(scores[n]).reshape(-1) for n in names]
    sizes = [f.numel() for f in flats]
    total = sum(sizes)
    keep_total = total - num_pruned(total, sparsity)
    floor_masks = []
    if min_kept_fraction > 0:
        for f in flats:
            k = max(1, int(round(min_kept_fraction * f.numel())))
            m = torch.zeros_like(f, dtype=torch.bool)
            m[torch.topk(f, k, sorted=False).indices] = True
            floor_masks.append(m)
        # Floor weights are kept unconditionally: give them +inf so the global top-k takes them first.
        flats = [torch.where(m, torch.full_like(f, float("inf")), f) for f, m in zip(flats, floor_masks)]
    allscores = torch.cat(flats)
    keep_total = max(keep_total, sum(int(m.sum()) for m in floor_masks)) if floor_masks else keep_total
    mask = torch.zeros(total, dtype=torch.bool, device=allscores.device)
    if keep_total > 0:
        mask[torch.topk(allscores, keep_total, sorted=False).indices] = True
    out = {}
    for name, chunk in zip(names, torch.split(mask, sizes)):
        out[name] = chunk.view_as(scores[name])
    return out


def check_nm(n: int, m: int, in_features: int | None = None, layer: str = "") -> None:
    """Validate an N:M pattern (``0 < n < m``) and, if given, that ``m`` divides ``in_features``."""
    if not (isinstance(n, int) and isinstance(m, int)) or not 0 < n < m:
        raise ValueError(f"N:M pattern needs integers 0 < N < M, got {n}:{m}")
    if in_features is not None and in_features % m != 0:
        where = f" of layer {layer}" if layer else ""
        raise ValueError(f"N:M pattern {n}:{m} does not divide in_features={in_features}{where}")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive scores along the input (last) dimension."""
    out_features, in_features = scores.shape
    check_nm(n, m, in_features)
    groups = finite_scores(scores).reshape(out_features, in_features // m, m)
    idx = torch.topk(groups, n, dim=-1, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.view(out_features, in_features)


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """Parse ``"unstructured"``/None → None, ``"2:4"`` → (2, 4); anything else is an error."""
    if pattern is None or pattern == "unstructured":
        return None
    if isinstance(pattern, int):
        raise ValueError(
            f"pattern {pattern!r} is an integer: YAML reads an unquoted N:M like 2:4 as a base-60 number; "
            "quote it: pattern: '2:4'"
        )
    try:
        n_str, m_str = pattern.split(":")
        n, m = int(n_str), int(m_str)
    except (ValueError, AttributeError):
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' like '2:4', got {pattern!r}") from None
    check_nm(n, m)
    return n, m


def select_masks(
    scores: dict[str, torch.Tensor],
    sparsity: float,
    scope: str = "global",
    pattern: str | None = "unstructured",
    min_kept_fraction: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Masks for a target sparsity from per-layer scores (higher = more important).

    ``scope="global"``: one threshold across layers (`global_topk_masks`); ``"layer"``: each layer
    at the target (`topk_mask`). An ``"N:M"`` pattern gives N:M masks per layer (`nm_mask`) and
    ignores ``sparsity`` (the pattern fixes it at ``1 - N/M``).
    """
    nm = parse_pattern(pattern)
    if nm is not None:
        return {name: nm_mask(s, *nm) for name, s in scores.items()}
    if scope == "global":
        return global_topk_masks(scores, sparsity, min_kept_fraction)
    if scope == "layer":
        return {name: topk_mask(s, sparsity) for name, s in scores.items()}
    raise ValueError(f"unknown sparsity scope {scope!r}; choose 'global' or 'layer'")
