"""Mini-batch gradient sampler for the empirical Fisher, drawn from the Trainer's own training data.

Reuses the train dataloader's dataset and collate function, the model's own loss (``outputs.loss``, what
`Trainer.compute_loss` uses by default), its device and the run's autocast setting, on a separate
index stream (its own `torch.Generator`), so the training loop's dataloader position, RNG state,
optimizer and accumulated ``.grad`` are left exactly as they were. Gradients are taken in eval mode
(no dropout), as in SparseML's OBS modifier.

Under torch.distributed the j-th sampled mini-batch goes to rank ``j mod world``: the ranks see
disjoint data whose union is what a single process would draw.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

LossFn = Callable[[nn.Module, dict[str, Any]], torch.Tensor]


def model_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The model's own loss for a collated batch with labels (``outputs.loss`` / ``outputs[0]``)."""
    out = model(**batch)
    loss = out["loss"] if isinstance(out, dict) or hasattr(out, "keys") else out[0]
    if loss is None:
        raise ValueError("model returned no loss: the gradient sampler needs batches with labels")
    return loss


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GradientSampler:
    """Draws mini-batches from ``dataset`` and yields the gradients of chosen parameters, one per batch.

    Args:
        dataset: map-style dataset (``len`` and ``__getitem__``), e.g. ``train_dataloader.dataset``.
        collate_fn: the training collator (``train_dataloader.collate_fn``).
        batch_size: examples per gradient (a gradient is one mini-batch's mean-loss gradient).
        seed: base seed of the sampler's own generator; the batches of a call depend only on
            ``(seed, round_key)``, never on the global RNG.
        loss_fn: ``loss_fn(model, batch) → scalar``; default `model_loss`.
        autocast_dtype: run forward under `torch.autocast` with this dtype (the Trainer's bf16/fp16).
        rank, world_size: default from torch.distributed.
    """

    def __init__(
        self,
        dataset: Any,
        collate_fn: Callable[[list[Any]], dict[str, Any]],
        batch_size: int,
        seed: int = 0,
        loss_fn: LossFn | None = None,
        autocast_dtype: torch.dtype | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"gradient batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError(f"gradient sampler needs a map-style dataset, got {type(dataset).__name__}")
        if len(dataset) == 0:
            raise ValueError("gradient sampler got an empty dataset")
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.seed = int(seed)
        self.loss_fn = loss_fn or model_loss
        self.autocast_dtype = autocast_dtype
        dist_rank, dist_world = _dist_info()
        self.rank = dist_rank if rank is None else rank
        self.world_size = dist_world if world_size is None else world_size

    @classmethod
    def from_trainer(
        cls,
        args: Any,
        train_dataloader: torch.utils.data.DataLoader,
        batch_size: int | None = None,
        seed: int = 0,
        loss_fn: LossFn | None = None,
    ) -> GradientSampler:
        """Sampler over the Trainer's train dataset and collator (``args``: its `TrainingArguments`)."""
        if train_dataloader is None:
            raise ValueError("the gradient sampler needs the Trainer's train_dataloader (got None)")
        dtype = None
        if getattr(args, "bf16", False):
            dtype = torch.bfloat16
        elif getattr(args, "fp16", False):
            dtype = torch.float16
        bs = batch_size or getattr(args, "per_device_train_batch_size", None) or train_dataloader.batch_size
        return cls(train_dataloader.dataset, train_dataloader.collate_fn, int(bs), seed, loss_fn, dtype)

    def batch_indices(self, num_batches: int, round_key: int) -> list[list[int]]:
        """This rank's ``num_batches`` index lists for one sampling round (deterministic in seed, round, rank)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(round_key))
        n, bs = len(self.dataset), self.batch_size
        needed = num_batches * self.world_size * bs
        perm = torch.cat([torch.randperm(n, generator=gen) for _ in range(-(-needed // n))])[:needed]
        batches = perm.view(num_batches * self.world_size, bs)
        return batches[self.rank :: self.world_size].tolist()

    def _batch(self, indices: list[int], device: torch.device) -> dict[str, Any]:
        getitems = getattr(self.dataset, "__getitems__", None)
        examples = getitems(indices) if getitems is not None else [self.dataset[i] for i in indices]
        batch = self.collate_fn(examples)
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def sample(
        self,
        model: nn.Module,
        params: Sequence[nn.Parameter],
        num_batches: int,
        round_key: int = 0,
        masks: Sequence[torch.Tensor | None] | None = None,
    ) -> Iterator[list[torch.Tensor]]:
        """Yield, for each of this rank's ``num_batches`` mini-batches, the flattened float32 gradients of ``params``.

        ``masks`` (optional, one per param) zero the gradients of pruned weights (their Fisher rows
        then decouple, as in SparseML). The model's mode, ``.grad``s, ``requires_grad`` flags and the
        global RNG states are restored when the generator finishes or is closed.
        """
        device = next(model.parameters()).device
        with preserved_training_state(model, params), torch.enable_grad():
            autocast = (
                torch.autocast(device.type, dtype=self.autocast_dtype)
                if self.autocast_dtype is not None
                else contextlib.nullcontext()
            )
            for indices in self.batch_indices(num_batches, round_key):
                batch = self._batch(indices, device)
                with autocast:
                    loss = self.loss_fn(model, batch)
                loss.backward()
                grads = []
                for i, p in enumerate(params):
                    g = p.grad.detach().reshape(-1).float()
                    if masks is not None and masks[i] is not None:
                        g = g * masks[i].reshape(-1).to(g.device, g.dtype)
                    grads.append(g)
                    p.grad = None
                yield grads


@contextlib.contextmanager
def preserved_training_state(model: nn.Module, params: Sequence[nn.Parameter]):
    """Eval mode, grads only for ``params`` (others frozen), fresh ``.grad``s; restore everything after."""
    was_training = model.training
    all_params = list(model.parameters())
    saved_grads = [p.grad for p in all_params]
    saved_flags = [p.requires_grad for p in all_params]
    wanted = {id(p) for p in params}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        model.eval()
        for p in all_params:
            p.grad = None
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for p, g, flag in zip(all_params, saved_grads, saved_flags, strict=True):
            p.grad = g
            p.requires_grad_(flag)
        model.train(was_training)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
