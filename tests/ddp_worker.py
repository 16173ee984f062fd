"""Run by `torchrun --nproc_per_node 2` from test_ddp.py: magnitude pruning under DDP (gloo, CPU).

Each rank saves its final masks and weights to ``<out>/rank<r>.pt``. Ranks start from different
random weights on purpose: DDP broadcasts rank 0's parameters, and the pruning callback must then
give every rank the same masks.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import make_trainer, tiny_bert  # noqa: E402

from prune_trainer import MagnitudePruningCallback, PruningConfig, PruningSchedule  # noqa: E402


def main(out: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    model = tiny_bert(seed=rank)
    pruner = MagnitudePruningCallback(
        model, PruningConfig(schedule=PruningSchedule(final_sparsity=0.7, start_step=1, end_step=6, frequency=2))
    )
    trainer = make_trainer(Path(out) / "trainer", model, [pruner], max_steps=8, ddp_backend="gloo",
                           per_device_train_batch_size=4)
    trainer.train()
    torch.save(
        {
            "world_size": trainer.args.world_size,
            "masks": {n: layer.weight_mask.clone() for n, layer in pruner.layers.items()},
            "weights": {n: layer.weight.detach().clone() for n, layer in pruner.layers.items()},
        },
        Path(out) / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1])
