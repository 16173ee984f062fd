"""The LLM Surgeon procedure over a whole model (van der Ouderaa et al. 2024, Algorithms 2 and 3), with its
baselines in the same code.

For shot ``t = 1..T``: KFAC curvature of every target Linear at the current weights (`kfac`), costs of every
element / N:M group / coupled structure (`llm_surgeon`), a threshold on the costs for the interpolated target
``s_t = s·t/T`` — one threshold across all layers (``allocation="global"``, the paper's dynamic allocation) or
one per Linear / per layer (``"uniform"``) — and the weight update of each Linear for everything removed so far.
Removed weights stay removed in later shots.

Methods (``variant``): ``llm-surgeon`` — costs with ``(G⊗A)⁻¹``, correlated updates (eq. 16, 27, 28);
``k-obd`` — KFAC-diagonal costs within the removed rows/columns/elements, no update (eq. 18, 23);
``structured-obs`` — ``F = I ⊗ A`` (the layer's ``XXᵀ`` only, no gradients): OBS costs and updates of the
layer-wise reconstruction objective; ``structured-magnitude`` — ``F = I ⊗ I``: the squared L2 norm of what is removed,
no update (no data used for the choice). Structures: unstructured elements, N:M groups of consecutive inputs, or coupled
heads / FFN neurons (`prune_trainer.structures`: rows of one Linear with columns of the next, costed together).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from prune_trainer.oneshot import llm_surgeon as ls
from prune_trainer.oneshot.kfac import KroneckerFactors, collect_kfac, damped, factor_bytes, plan_passes
from prune_trainer.options import Options
from prune_trainer.structures import find_structures

SURGEON_METHODS: tuple[str, ...] = ("llm-surgeon", "k-obd", "structured-obs", "structured-magnitude")
NO_UPDATE = ("k-obd", "structured-magnitude")
"""Variants that only zero what they remove (no correlated update)."""


@dataclass
class SurgeonOptions(Options):
    """Options of ``llm-surgeon`` / ``k-obd`` / ``structured-obs`` (``OneShotConfig.options``).

    ``shots``: T (curvature recomputed before each, target interpolated linearly); ``allocation``: one cost
    threshold across layers (``global``) or the same sparsity in every Linear / layer (``uniform``); ``labels``:
    the loss's labels for ``G`` (``empirical`` or ``sampled`` from the model); ``damp_a`` / ``damp_g``: damping
    fractions of the mean diagonal (``damp_g`` None: 0.1 structured, 0.01 otherwise — the paper's App. C.2);
    ``memory_limit_mib``: bound on the KFAC factors held at once; ``cg_iters`` / ``cg_tol``: the conjugate-gradient
    solve of the unstructured correlated update; ``min_groups``: structures kept per layer and kind at least;
    ``max_layer_sparsity``: with global allocation of elements / N:M groups, no Linear is pruned beyond this;
    ``update``: False zeroes what is removed without the correlated update (an ablation of ``llm-surgeon``).
    """

    section = "llm-surgeon options"

    shots: int = 1
    allocation: Literal["global", "uniform"] = "uniform"
    labels: Literal["empirical", "sampled"] = "empirical"
    damp_a: float = 0.01
    damp_g: float | None = None
    memory_limit_mib: float = 4096.0
    cg_iters: int = 50
    cg_tol: float = 1e-4
    min_groups: int = 1
    max_layer_sparsity: float = 1.0
    update: bool = True
    seed: int = 0

    def validate(self) -> None:
        if self.shots < 1:
            raise ValueError(f"{self.section}: shots must be >= 1, got {self.shots}")
        if self.damp_a < 0 or (self.damp_g is not None and self.damp_g < 0):
            raise ValueError(f"{self.section}: damping must be >= 0, got damp_a={self.damp_a}, damp_g={self.damp_g}")
        if not 0.0 < self.max_layer_sparsity <= 1.0:
            raise ValueError(f"{self.section}: max_layer_sparsity must be in (0, 1], got {self.max_layer_sparsity}")
        if self.memory_limit_mib <= 0 or self.cg_iters < 0 or self.cg_tol < 0 or self.min_groups < 1:
            raise ValueError(f"{self.section}: memory_limit_mib > 0, cg_iters >= 0, cg_tol >= 0, min_groups >= 1")


@dataclass
class SurgeonReport:
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    curvature_time_s: float = 0.0
    solve_time_s: float = 0.0
    total_time_s: float = 0.0
    n_tokens: int = 0
    factor_mib: float = 0.0
    passes: int = 0
    cg_iterations: int = 0
    removed_groups: dict[str, int] = field(default_factory=dict)


@dataclass
class _Layer:
    """One Linear's augmented weight ``[W | b]`` (float64) and its damped factors and inverses."""

    W: torch.Tensor
    G: torch.Tensor
    A: torch.Tensor
    g_inv: torch.Tensor
    a_inv: torch.Tensor


def _layer(lin: nn.Linear, f: KroneckerFactors, damp_a: float, damp_g: float, variant: str) -> _Layer:
    W = lin.weight.detach().double()
    if lin.bias is not None:
        W = torch.cat([W, lin.bias.detach().double()[:, None]], 1)
    G = damped(f.g(), damp_g) if f.g_sum is not None else f.g()
    A = damped(f.a(), damp_a)
    if variant == "structured-magnitude":
        A = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    g_inv, a_inv = ls.kron_inverse(G, A)
    return _Layer(W.to(A.device), G, A, g_inv, a_inv)


def _write(lin: nn.Linear, W: torch.Tensor, name: str) -> None:
    if not torch.isfinite(W).all():
        raise ValueError(f"{name}: the weight update produced non-finite values (check the calibration data)")
    lin.weight.data.copy_(W[:, : lin.in_features].to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.data.copy_(W[:, lin.in_features].to(lin.bias.dtype))


def _take_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` lowest ``scores`` (exactly ``k``; ties broken by position)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.argsort(scores.reshape(-1), stable=True)[:k]] = True
    return mask.view(scores.shape)


def _nm_groups(cost: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N:M groups of ``m`` consecutive inputs: ``(group costs [R, C/m], element picks [R, C])`` — each group's cost is
    the sum of its ``m−n`` cheapest element costs (independent within the group), the picks those elements."""
    groups = cost.view(cost.shape[0], -1, m)
    low = groups.topk(m - n, dim=-1, largest=False)
    picks = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, low.indices, True)
    return low.values.sum(-1), picks.view(cost.shape)


def _select(
    costs: dict[str, torch.Tensor], frac: float, allocation: str, cap: float = 1.0
) -> dict[str, torch.Tensor]:
    """The ``round(frac·total)`` cheapest entries across all tensors (global; at most ``floor(cap·size)`` of each)
    or of each tensor (uniform)."""
    if allocation == "uniform":
        return {n: _take_lowest(c, int(round(frac * c.numel()))) for n, c in costs.items()}
    if cap < 1.0:  # entries past a tensor's cap-th cheapest can never be chosen
        costs = {n: c.masked_fill(~_take_lowest(c, int(cap * c.numel())), torch.inf) for n, c in costs.items()}
    flat = torch.cat([c.reshape(-1) for c in costs.values()])
    chosen = _take_lowest(flat, int(round(frac * flat.numel()))).split([c.numel() for c in costs.values()])
    return {n: pick.view(c.shape) for (n, c), pick in zip(costs.items(), chosen, strict=True)}


class _Elements:
    """Unstructured elements (``prunem = 0``) or N:M groups of ``prunem`` consecutive inputs of each row; removed
    elements get cost −inf, so later shots keep them (and an N:M group once chosen keeps its elements)."""

    def __init__(
        self, model: nn.Module, names: list[str], prunen: int, prunem: int, allocation: str, cap: float = 1.0
    ) -> None:
        self.linears = {n: model.get_submodule(n) for n in names}
        self.cap = cap
        self.pruned = {n: torch.zeros(lin.weight.shape, dtype=torch.bool) for n, lin in self.linears.items()}
        self.n, self.m, self.allocation = prunen, prunem, allocation
        for name, lin in self.linears.items():
            if prunem and lin.in_features % prunem:
                raise ValueError(f"{name}: in_features {lin.in_features} is not a multiple of M={prunem}")

    @property
    def names(self) -> list[str]:
        return list(self.linears)

    def costs(self, name: str, L: _Layer, variant: str) -> torch.Tensor:
        """Element costs of the weight (bias column excluded; removed ones −inf), on the CPU."""
        if variant in NO_UPDATE:
            cost = ls.element_costs_obd(L.W, L.G, L.A)
        else:
            cost = ls.element_costs(L.W, L.g_inv, L.a_inv)
        return cost[:, : self.linears[name].in_features].cpu().masked_fill(self.pruned[name], -torch.inf)

    def select(self, costs: dict[str, torch.Tensor], frac: float) -> None:
        """Remove the cheapest elements (N:M: whole groups) up to ``frac`` of all (global) or of each Linear."""
        if not self.m:
            for name, pick in _select(costs, frac, self.allocation, self.cap).items():
                self.pruned[name] |= pick
            return
        groups = {n: _nm_groups(c, self.n, self.m) for n, c in costs.items()}
        picks = _select({n: g[0] for n, g in groups.items()}, frac, self.allocation, self.cap)
        for name, pick in picks.items():
            self.pruned[name] |= groups[name][1] & pick.repeat_interleave(self.m, dim=1)

    def update(self, name: str, L: _Layer, variant: str, opts: SurgeonOptions) -> tuple[torch.Tensor, int]:
        """``[W | b]`` after removing every selected element: the joint correlated update (eq. 16) or, for K-OBD,
        none. Returns the new weight and the conjugate-gradient iterations."""
        prune = torch.zeros_like(L.W, dtype=torch.bool)
        prune[:, : self.linears[name].in_features] = self.pruned[name].to(L.W.device)
        if variant in NO_UPDATE or not opts.update:
            return L.W.masked_fill(prune, 0.0), 0
        W, G, A = (x.float() for x in (L.W, L.G, L.A))
        new, iters = ls.masked_update(W, G, A, prune, opts.cg_iters, opts.cg_tol)
        return new.double(), iters

    def sparsity(self, name: str) -> float:
        return float(self.pruned[name].float().mean())


class _Groups:
    """Coupled structures (attention heads, FFN neurons): a group's cost is the sum over its coupled Linears of the
    correlated cost of removing its rows (or columns) there — exact for KFAC's block-diagonal ``F``."""

    def __init__(self, model: nn.Module, kinds: list[str], allocation: str, min_groups: int) -> None:
        self.structures = find_structures(model, kinds)
        self.coupled = {c.name: (kind, c) for kind, g in self.structures.groups.items() for c in g.linears}
        self.linears = {n: model.get_submodule(n) for n in self.coupled}
        self.removed = {k: torch.zeros(g.num_groups, dtype=torch.bool) for k, g in self.structures.groups.items()}
        self.allocation, self.min_groups = allocation, min_groups
        for kind, groups in self.structures.groups.items():
            if min(groups.sizes) <= min_groups:
                raise ValueError(f"a layer has only {min(groups.sizes)} {kind} groups; min_groups={min_groups}")

    @property
    def names(self) -> list[str]:
        return list(self.linears)

    def costs(self, name: str, L: _Layer, variant: str) -> torch.Tensor:
        """Costs ``[groups of the kind]`` of removing each group's rows/columns in this Linear (0 for other layers)."""
        kind, coupled = self.coupled[name]
        index, ids = ls.group_index(coupled.group_ids.to(L.W.device))
        diag = variant in NO_UPDATE
        if coupled.axis == 0:
            fn = ls.row_group_costs_obd if diag else ls.row_group_costs
            cost = fn(L.W, L.A, L.G if diag else L.g_inv, index)
        else:
            fn = ls.col_group_costs_obd if diag else ls.col_group_costs
            cost = fn(L.W, L.G, L.A if diag else L.a_inv, index)
        out = torch.zeros(self.structures.groups[kind].num_groups, dtype=torch.float64)
        return out.index_put_((ids.cpu(),), cost.cpu())

    def select(self, costs: dict[str, torch.Tensor], frac: float) -> None:
        """Remove the cheapest groups (cost per coupled weight) until ``frac`` of the coupled weights are removed:
        across layers and kinds (global) or ``round(frac·size)`` of each layer and kind (uniform); removed groups
        stay removed; every layer keeps at least ``min_groups`` of each kind."""
        scores, weights, spans = [], [], []
        for kind, groups in self.structures.groups.items():
            total = sum(c for n, c in costs.items() if self.coupled[n][0] == kind)
            score = (total / groups.weights_per_group).masked_fill(self.removed[kind], -torch.inf)
            for off, size in zip(groups.layer_offsets(), groups.sizes, strict=True):
                part = score[off : off + size]
                if self.allocation == "uniform":
                    k = min(int(round(frac * size)), size - self.min_groups)
                    part[~_take_lowest(part, k)] = torch.inf
                else:
                    part[part.topk(self.min_groups).indices] = torch.inf
            scores.append(score)
            weights.append(torch.full_like(score, float(groups.weights_per_group)))
            spans.append(groups.num_groups)
        score, weight = torch.cat(scores), torch.cat(weights)
        order = torch.argsort(score, stable=True)
        budget = frac * float(weight.sum()) + 0.5 * float(weight.min())
        take = torch.isfinite(score[order])
        if self.allocation == "global":
            take &= weight[order].cumsum(0) <= budget
        chosen = torch.zeros_like(score, dtype=torch.bool)
        chosen[order[take]] = True
        for kind, part in zip(self.structures.groups, chosen.split(spans), strict=True):
            self.removed[kind] |= part

    def lines(self, name: str) -> torch.Tensor:
        """Rows (axis 0) or columns (axis 1) of this Linear whose group is removed."""
        kind, coupled = self.coupled[name]
        return torch.nonzero(self.removed[kind][coupled.group_ids], as_tuple=True)[0]

    def update(self, name: str, L: _Layer, variant: str, opts: SurgeonOptions) -> tuple[torch.Tensor, int]:
        """``[W | b]`` after removing the selected rows (eq. 27) or columns (eq. 28) together; K-OBD zeroes them."""
        lines = self.lines(name).to(L.W.device)
        axis = self.coupled[name][1].axis
        if variant in NO_UPDATE or not opts.update:
            W = L.W.clone()
            W.index_fill_(axis, lines, 0.0)
            return W, 0
        if axis == 0:
            return ls.remove_rows(L.W, L.g_inv, lines), 0
        return ls.remove_cols(L.W, L.a_inv, lines), 0

    def sparsity(self, name: str) -> float:
        lin = self.linears[name]
        lines = lin.out_features if self.coupled[name][1].axis == 0 else lin.in_features
        return self.lines(name).numel() / lines


def _shot(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], mode: _Elements | _Groups, passes: list[list[str]],
    frac: float, variant: str, opts: SurgeonOptions, damp_g: float, report: SurgeonReport,
) -> None:
    """One shot: curvature at the current weights, costs, selection up to ``frac``, updates (see module doc).
    With several passes the factors are collected again for the updates (before any weight changes)."""
    with_g = variant not in ("structured-obs", "structured-magnitude")
    held: dict[str, _Layer] = {}
    costs: dict[str, torch.Tensor] = {}

    def layers(names: list[str]) -> dict[str, _Layer]:
        t0 = time.perf_counter()
        factors = collect_kfac(model, batches, names, opts.labels, with_g, opts.seed)
        report.curvature_time_s += time.perf_counter() - t0
        report.n_tokens = next(iter(factors.values())).n
        return {n: _layer(mode.linears[n], factors[n], opts.damp_a, damp_g, variant) for n in names}

    for names in passes:
        current = layers(names)
        t0 = time.perf_counter()
        costs.update({n: mode.costs(n, L, variant) for n, L in current.items()})
        report.solve_time_s += time.perf_counter() - t0
        if len(passes) == 1:
            held = current
    bad = [n for n, c in costs.items() if torch.isnan(c).any() or (c == torch.inf).any()]
    if bad:
        raise ValueError(f"non-finite pruning costs in {bad[:3]} (check the calibration data and damping)")
    t0 = time.perf_counter()
    mode.select(costs, frac)
    report.solve_time_s += time.perf_counter() - t0
    pending = {}
    for names in passes:
        current = held or layers(names)
        t0 = time.perf_counter()
        for name in names:
            pending[name], iters = mode.update(name, current[name], variant, opts)
            report.cg_iterations += iters
        report.solve_time_s += time.perf_counter() - t0
    for name, W in pending.items():
        _write(mode.linears[name], W, name)


def surgeon_prune(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    variant: str,
    sparsity: float,
    names: list[str],
    prunen: int = 0,
    prunem: int = 0,
    structures: list[str] | None = None,
    options: SurgeonOptions | None = None,
    progress: bool = True,
) -> SurgeonReport:
    """Prune ``model`` in place with ``variant`` (`SURGEON_METHODS`) to ``sparsity``: of the Linears ``names``
    (unstructured, or N:M when ``prunem``), or of the coupled weights of ``structures`` (``["heads", "ffn"]``).
    ``batches``: labelled calibration batches (`labelled_calibration_batches`; a causal LM's windows through
    `next_token_labels`). Prints the KFAC factor sizes first;
    a Linear whose factors exceed ``options.memory_limit_mib`` is a ValueError before any pass."""
    opts = options or SurgeonOptions()
    if variant not in SURGEON_METHODS:
        raise ValueError(f"unknown LLM Surgeon variant {variant!r}; choose one of {list(SURGEON_METHODS)}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), got {sparsity}")
    start = time.perf_counter()
    target = 1.0 - prunen / prunem if prunem else sparsity
    cap = 1.0 if prunem or structures else opts.max_layer_sparsity  # N:M ends with every group pruned
    if cap < target:
        raise ValueError(f"max_layer_sparsity {cap} is below the target sparsity {target}")
    mode = _Groups(model, structures, opts.allocation, opts.min_groups) if structures else _Elements(
        model, names, prunen, prunem, opts.allocation, cap)
    with_g = variant not in ("structured-obs", "structured-magnitude")
    sizes = {n: factor_bytes(lin, with_g) for n, lin in mode.linears.items()}
    passes = plan_passes(sizes, int(opts.memory_limit_mib * 2**20))
    report = SurgeonReport(factor_mib=sum(sizes.values()) / 2**20, passes=len(passes))
    largest = max(sizes, key=sizes.get)
    print(f"KFAC factors: {report.factor_mib:.1f} MiB for {len(sizes)} Linears (largest {largest}: "
          f"{sizes[largest] / 2**20:.1f} MiB); {len(passes)} calibration pass(es) per shot", flush=True)
    damp_g = opts.damp_g if opts.damp_g is not None else (0.1 if structures else 0.01)
    for t in tqdm(range(1, opts.shots + 1), desc=f"{variant} shots", disable=not progress):
        frac = (t / opts.shots) if prunem else target * t / opts.shots
        _shot(model, batches, mode, passes, frac, variant, opts, damp_g, report)
    report.layer_sparsity = {n: mode.sparsity(n) for n in mode.names}
    if isinstance(mode, _Groups):
        report.removed_groups = {k: int(v.sum()) for k, v in mode.removed.items()}
    report.total_time_s = time.perf_counter() - start
    return report
