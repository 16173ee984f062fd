"""Run by `torchrun --nproc_per_node 2` from test_ddp.py: pruning under DDP (gloo, CPU).

``ddp_worker.py <out> [magnitude|movement|movement-accum|structured]``. Each rank saves its final masks and weights
(movement: also its scores just before training ends, and how often the score gradients were averaged) to
``<out>/rank<r>.pt``.
Movement runs with the Trainer's gradient clipping on (``max_grad_norm=1.0``); ``movement-accum`` also accumulates
gradients over 2 micro-batches. Ranks start from different random weights
on purpose: DDP broadcasts rank 0's parameters, and the pruning callback must then give every rank the
same masks (movement: the same scores, although each rank trains on its own data shard).
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import end_process_group, make_trainer, tiny_bert  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from prune_trainer import (  # noqa: E402
    MagnitudePruningCallback,
    PruningConfig,
    PruningSchedule,
    StructuredPruningCallback,
)
from prune_trainer.callbacks.movement import MovementPruningCallback  # noqa: E402


class KeepScores(TrainerCallback):
    """Copies the movement scores after every step (``on_train_end`` drops them)."""

    def __init__(self, pruner: MovementPruningCallback) -> None:
        self.pruner, self.scores = pruner, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.scores = {n: layer.mask_scores.detach().clone() for n, layer in self.pruner.layers.items()}


def main(out: str, method: str = "magnitude") -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    model = tiny_bert(seed=rank, num_attention_heads=4) if method == "structured" else tiny_bert(seed=rank)
    schedule = PruningSchedule(final_sparsity=0.7, start_step=1, end_step=6, frequency=2)
    accum = 2 if method == "movement-accum" else 1
    averaged = [0]
    if method.startswith("movement"):
        pruner = MovementPruningCallback(model, PruningConfig(method="movement", schedule=schedule),
                                         variant="hard", score_lr=0.1)
        average = pruner.average_score_grads

        def counted_average() -> None:
            averaged[0] += 1
            average()

        pruner.average_score_grads = counted_average
        callbacks = [pruner, KeepScores(pruner)]
    elif method == "structured":
        pruner = StructuredPruningCallback(model, final_sparsity=0.5, start_step=1, end_step=6, frequency=2,
                                           score="taylor", round_to_ffn=8)
        callbacks = [pruner]
    else:
        pruner = MagnitudePruningCallback(model, PruningConfig(schedule=schedule))
        callbacks = [pruner]
    trainer = make_trainer(Path(out) / "trainer", model, callbacks, max_steps=8, ddp_backend="gloo",
                           per_device_train_batch_size=4 // accum, gradient_accumulation_steps=accum, max_grad_norm=1.0)
    trainer.train()
    torch.save(
        {
            "world_size": trainer.args.world_size,
            "masks": {n: layer.weight_mask.clone() for n, layer in pruner.layers.items()},
            "weights": {n: layer.weight.detach().clone() for n, layer in pruner.layers.items()},
            "scores": callbacks[-1].scores if method.startswith("movement") else {},
            "averaged": averaged[0],
            "optimizer_steps": trainer.state.global_step,
        },
        Path(out) / f"rank{rank}.pt",
    )
    end_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
