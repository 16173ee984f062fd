"""`OBERTPruningCallback`: gradual second-order pruning with a block-diagonal empirical Fisher (oBERT).

At each pruning step of the schedule (Kurtic et al. 2022, "The Optimal BERT Surgeon", §3):
collect m mini-batch gradients of the target layers from the training data → build the block-diagonal
Fisher inverse per layer → score ``ρ = w²/(2[F⁻¹]_ii)`` → select masks (global or per layer; pruned
weights stay pruned) → OBS-update the remaining weights of each block (joint solve by default, or the
reference's summed single-weight form). ``num_recomputations`` repeats collect→prune k times inside
one step, raising the sparsity linearly in k sub-steps. Optional learning-rate rewinding restarts a
linear decay of the learning rate at every pruning step.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from prune_trainer.callbacks.base import MethodNeeds, PruningCallback, PruningContext
from prune_trainer.config import PruningConfig
from prune_trainer.methods.obert.fisher import BlockFisherInverse, fisher_inverse_bytes, format_bytes
from prune_trainer.methods.obert.sampler import GradientSampler, LossFn
from prune_trainer.methods.obert.update import obs_scores, obs_update
from prune_trainer.options import Options

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class OBERTOptions(Options):
    """oBERT options (Kurtic et al. 2022).

    ``num_grads``: m, gradients in the empirical Fisher (total over ranks; CPU recipes use fewer).
    ``grad_batch_size``: examples per gradient (None = the Trainer's per-device train batch size).
    ``block_size``: B, weights per Fisher block. ``damp``: λ of ``F = λI + (1/m) Σ g gᵀ``.
    ``fisher_form``: ``"direct"`` (GᵀG + batched Cholesky inverse) or ``"woodbury"`` (rank-1 updates).
    ``fisher_dtype``: block storage precision. ``update``: OBS update of the kept weights, ``"joint"``
    (one solve per block), ``"summed"`` (the reference's sum of single-weight updates) or ``"none"``.
    ``num_recomputations``: collect → prune rounds inside one pruning step (sparsity raised linearly).
    ``layers_per_pass``: None = all layers' Fisher blocks at once; k = k layers at a time (bounds memory).
    ``grad_chunk``: gradients added to the Fisher per batched call. ``mask_gradients``: zero the gradients
    of already-pruned weights (decouples them, as SparseML). ``lr_rewind``: restart a linear LR decay at
    every pruning step. ``seed``: of the gradient sampler. ``verbose``: print sizes and timings.
    """

    section = "obert options"

    num_grads: int = 1024
    grad_batch_size: int | None = None
    block_size: int = 50
    damp: float = 1e-7
    fisher_form: Literal["direct", "woodbury"] = "direct"
    fisher_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    update: Literal["joint", "summed", "none"] = "joint"
    num_recomputations: int = 1
    layers_per_pass: int | None = None
    grad_chunk: int = 16
    mask_gradients: bool = True
    lr_rewind: bool = False
    seed: int = 0
    verbose: bool = True

    def validate(self) -> None:
        for key in ("num_grads", "block_size", "num_recomputations", "grad_chunk"):
            if getattr(self, key) < 1:
                raise ValueError(f"obert {key} must be a positive integer, got {getattr(self, key)!r}")
        if not self.damp > 0:
            raise ValueError(f"obert damp must be > 0, got {self.damp!r}")
        for key in ("layers_per_pass", "grad_batch_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"obert {key} must be null or a positive integer, got {value!r}")


class RewindLambda:
    """LR multiplier for learning-rate rewinding: 1 at each pruning step, linear decay to 0 at the next.

    ``points`` are the pruning steps followed by ``max_steps``; before the first point the
    wrapped ``base`` multiplier is used. ``LambdaLR.state_dict`` saves a callable object's ``__dict__``:
    only ``points`` (ints) lives there, ``base`` (the Trainer's ``functools.partial``) sits in a slot, so the
    saved scheduler state loads with ``torch.load(weights_only=True)``; on resume the Trainer loads it into
    its own multipliers and ``install_lr_rewind`` (``on_train_begin``) then wraps them again.
    """

    __slots__ = ("base", "__dict__")

    def __init__(self, points: list[int], base: Any = None) -> None:
        self.points = sorted(set(int(p) for p in points))
        self.base = base

    def __call__(self, step: int) -> float:
        pts = self.points
        if step < pts[0]:
            return float(self.base(step)) if callable(self.base) else 1.0
        k = max(i for i, p in enumerate(pts) if p <= step)
        if k == len(pts) - 1:
            return 0.0
        return max(0.0, 1.0 - (step - pts[k]) / (pts[k + 1] - pts[k]))


class OBERTPruningCallback(PruningCallback):
    """oBERT gradual pruning on a plain `Trainer`.

    Example::

        cb = OBERTPruningCallback(model, num_grads=64, block_size=50, update="joint",
                                  initial_sparsity=0.7, final_sparsity=0.9, end_step=0.6, frequency=100)
        Trainer(model=model, args=args, train_dataset=..., data_collator=..., callbacks=[cb])

    Options: `OBERTOptions` (``config.options`` or keyword arguments, as schedule and config fields).
    ``loss_fn(model, batch)`` replaces the model's own loss; ``sampler`` replaces the Trainer-data gradient
    sampler (e.g. to prune outside a Trainer: ``pruner.prune(step, target=0.9)``).
    """

    method_name = "obert"
    options_class = OBERTOptions
    needs = MethodNeeds(updates_weights=True, calibration_data=True)

    def __init__(
        self,
        model: nn.Module,
        config: PruningConfig | None = None,
        *,
        loss_fn: LossFn | None = None,
        sampler: GradientSampler | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__(model, config, **overrides)
        if sampler is not None:  # gradients come from the given sampler, not from the Trainer's batches
            self.needs = dataclasses.replace(self.needs, calibration_data=False)
        self.loss_fn = loss_fn
        self.sampler = sampler
        self.stats: list[dict[str, Any]] = []

    # ---- Trainer events ---------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.options.lr_rewind:
            self.install_lr_rewind(kwargs.get("lr_scheduler"), state.max_steps)

    def install_lr_rewind(self, lr_scheduler: Any, max_steps: int) -> RewindLambda:
        """Replace the Trainer's LambdaLR multipliers by a sawtooth restarting at each pruning step."""
        sched = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps the scheduler
        if not isinstance(sched, LambdaLR):
            raise ValueError(f"lr_rewind needs a LambdaLR scheduler (Trainer's default), got {type(sched).__name__}")
        t0, t1 = int(self.schedule.start_step), int(self.schedule.end_step)
        points = [s for s in range(t0, min(t1, max_steps) + 1) if self.schedule.is_pruning_step(s)] + [max_steps]
        fns = [RewindLambda(points, base) for base in sched.lr_lambdas]
        sched.lr_lambdas = fns
        step = max(sched.last_epoch, 0)
        for group, base_lr, fn in zip(sched.optimizer.param_groups, sched.base_lrs, fns, strict=True):
            group["lr"] = base_lr * fn(step)
        sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
        return fns[0]

    # ---- pruning ----------------------------------------------------------------------------
    def compute_masks(self, step: int, target: float, context: PruningContext) -> dict[str, torch.Tensor]:
        """Prune to ``target``: ``num_recomputations`` rounds of collect → score → OBS update (weights change)."""
        self.prune_step(target, step, context.args, context.train_dataloader)
        return {name: layer.weight_mask.clone() for name, layer in self.layers.items()}

    @torch.no_grad()
    def prune_step(self, target: float, step: int = 0, args: Any = None, train_dataloader: Any = None) -> None:
        """One oBERT pruning step to sparsity ``target`` (usable outside a Trainer when ``sampler`` is set)."""
        sampler = self.sampler or GradientSampler.from_trainer(
            args, train_dataloader, self.options.grad_batch_size, self.options.seed, self.loss_fn
        )
        start = min(self.current_target, target)
        k = self.options.num_recomputations
        for r in range(1, k + 1):
            sparsity = start + (target - start) * r / k
            self._prune_round(sparsity, sampler, round_key=step * 1009 + r)

    def _layer_groups(self) -> list[list[str]]:
        names = list(self.layers)
        size = self.options.layers_per_pass or len(names)
        return [names[i : i + size] for i in range(0, len(names), size)]

    def _build_fisher(self, names: list[str], sampler: GradientSampler, round_key: int, timing: dict) -> dict:
        o = self.options
        world = sampler.world_size
        m_local = math.ceil(o.num_grads / world)
        m_total = m_local * world
        dtype = DTYPES[o.fisher_dtype]
        device = next(iter(self.layers.values())).weight.device
        size = sum(fisher_inverse_bytes(self.layers[n].weight.numel(), o.block_size, dtype) for n in names)
        if o.verbose and sampler.rank == 0:
            print(
                f"[obert] Fisher inverse for {len(names)} layer(s): {format_bytes(size)} "
                f"(B={o.block_size}, {o.fisher_dtype}, m={m_total}, form={o.fisher_form})",
                flush=True,
            )
        finvs = {
            n: BlockFisherInverse(
                self.layers[n].weight.numel(), o.block_size, m_total, o.damp, o.fisher_form, dtype, device
            )
            for n in names
        }
        params = [self.layers[n].weight for n in names]
        masks = [self.layers[n].weight_mask for n in names] if o.mask_gradients else None
        buffers: list[list[torch.Tensor]] = [[] for _ in names]

        def flush() -> None:
            t = time.perf_counter()
            for n, buf in zip(names, buffers, strict=True):
                if buf:
                    grads = torch.stack(buf)
                    if world > 1 and o.fisher_form == "woodbury":
                        gathered = [torch.empty_like(grads) for _ in range(world)]
                        dist.all_gather(gathered, grads)
                        grads = torch.cat(gathered)
                    finvs[n].add_grads(grads)
                    buf.clear()
            timing["fisher_s"] += time.perf_counter() - t

        t = time.perf_counter()
        for grads in sampler.sample(self.model, params, m_local, round_key, masks):
            for buf, g in zip(buffers, grads, strict=True):
                buf.append(g)
            if len(buffers[0]) >= o.grad_chunk:
                timing["collect_s"] += time.perf_counter() - t
                flush()
                t = time.perf_counter()
        timing["collect_s"] += time.perf_counter() - t
        flush()
        t = time.perf_counter()
        for n in names:
            if world > 1 and o.fisher_form == "direct":
                finvs[n].all_reduce_()
            finvs[n].finalize()
        timing["fisher_s"] += time.perf_counter() - t
        return finvs

    def _prune_round(self, sparsity: float, sampler: GradientSampler, round_key: int) -> None:
        """Collect → Fisher inverse → scores → masks → OBS update, layer group by layer group.

        With several layer groups and a global threshold, scores are computed group by group (kept,
        O(d)), masks chosen, then the Fisher of each group is rebuilt from the same mini-batches to
        compute the updates; new weights are applied only at the end, so every group's gradients are
        taken at the same weights as in the all-at-once computation.
        """
        timing = {"collect_s": 0.0, "fisher_s": 0.0, "score_s": 0.0, "update_s": 0.0}
        groups = self._layer_groups()
        local_select = self.config.scope == "layer" or self.config.nm is not None
        masks: dict[str, torch.Tensor] = {}
        new_weights: dict[str, torch.Tensor] = {}

        def update(names: list[str], finvs: dict) -> None:
            t = time.perf_counter()
            for n in names:
                layer = self.layers[n]
                new_weights[n] = obs_update(
                    layer.weight, ~masks[n], finvs[n], self.options.update, newly_pruned=layer.weight_mask & ~masks[n]
                )
            timing["update_s"] += time.perf_counter() - t

        if len(groups) == 1 or local_select:
            for names in groups:
                finvs = self._build_fisher(names, sampler, round_key, timing)
                t = time.perf_counter()
                scores = {n: obs_scores(self.layers[n].weight, finvs[n]) for n in names}
                masks.update(self.select(scores, sparsity))
                timing["score_s"] += time.perf_counter() - t
                update(names, finvs)
                del finvs
        else:
            scores = {}
            for names in groups:
                finvs = self._build_fisher(names, sampler, round_key, timing)
                t = time.perf_counter()
                scores.update({n: obs_scores(self.layers[n].weight, finvs[n]) for n in names})
                timing["score_s"] += time.perf_counter() - t
                del finvs
            t = time.perf_counter()
            masks = self.select(scores, sparsity)
            timing["score_s"] += time.perf_counter() - t
            for names in groups:
                finvs = self._build_fisher(names, sampler, round_key, timing)
                update(names, finvs)
                del finvs
        for n, w in new_weights.items():
            layer = self.layers[n]
            layer.weight.copy_(w.to(layer.weight.device, layer.weight.dtype))
            layer.set_mask(masks[n])
        self.stats.append({"round_key": round_key, "sparsity": sparsity, **{k: round(v, 3) for k, v in timing.items()}})
        if self.options.verbose and sampler.rank == 0:
            times = ", ".join(f"{k}={v:.2f}" for k, v in timing.items())
            print(f"[obert] pruned to {sparsity:.4f}: {times}", flush=True)

    # ---- checkpoint state -------------------------------------------------------------------
    def method_state(self) -> dict[str, Any]:
        return {"stats": self.stats}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.stats = list(state.get("stats", []))
