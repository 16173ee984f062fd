"""scripts/llm_recover.py: the fixed-mask fine-tune keeps the pruned weights exactly zero and lowers the loss."""

import torch

from scripts.llm_oneshot import measured_sparsity, prune_llm_sequential
from scripts.llm_recover import block_masks, fixed_mask_finetune
from tests.test_llm_text import tiny_llama


def test_fixed_mask_finetune_keeps_the_mask_and_learns():
    model = tiny_llama(7)
    x = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(0))
    prune_llm_sequential(model, x, "sparsegpt", 0.5, 2, 4, batch_size=4)
    masks = block_masks(model)
    assert measured_sparsity(model) == 0.5
    losses = fixed_mask_finetune(model, x[:2].repeat(10, 1), masks, lr=1e-2, batch_size=2, warmup=1)
    assert len(losses) == 10 and losses[-1] < losses[0]
    for name, keep in masks.items():
        w = model.get_submodule(name).weight
        assert torch.equal(w != 0, keep), name  # the same 2:4 pattern, pruned weights exactly zero
    assert not model.training
