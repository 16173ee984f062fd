"""oBERT (Kurtic et al. 2022): block-diagonal empirical Fisher inverse, gradient sampler, OBS scores/updates."""

from prune_trainer.methods.obert.fisher import BlockFisherInverse, fisher_inverse_bytes
from prune_trainer.methods.obert.sampler import GradientSampler, model_loss
from prune_trainer.methods.obert.update import joint_update_blocks, obs_scores, obs_update, summed_update_blocks

__all__ = [
    "BlockFisherInverse",
    "GradientSampler",
    "fisher_inverse_bytes",
    "joint_update_blocks",
    "model_loss",
    "obs_scores",
    "obs_update",
    "summed_update_blocks",
]
