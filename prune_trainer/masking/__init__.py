"""Masking core: masked Linear wrapper, injection by name pattern, mask selection, sparsity."""

from prune_trainer.masking.inject import (
    DEFAULT_EXCLUDE,
    find_target_linears,
    inject_masked_layers,
    masked_layers,
    resolve_targets,
    unwrap_masked_layers,
)
from prune_trainer.masking.masked_linear import MaskedConv1D, MaskedLinear
from prune_trainer.masking.selection import (
    check_nm,
    check_sparsity,
    global_topk_masks,
    nm_mask,
    parse_pattern,
    select_masks,
    topk_mask,
)
from prune_trainer.masking.sparsity import mask_sparsity, weight_sparsity_report

__all__ = [
    "DEFAULT_EXCLUDE",
    "MaskedConv1D",
    "MaskedLinear",
    "check_nm",
    "check_sparsity",
    "find_target_linears",
    "global_topk_masks",
    "inject_masked_layers",
    "mask_sparsity",
    "masked_layers",
    "nm_mask",
    "parse_pattern",
    "resolve_targets",
    "select_masks",
    "topk_mask",
    "unwrap_masked_layers",
    "weight_sparsity_report",
]
