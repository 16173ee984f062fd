"""scripts/llm_recover.py: pruning through the library's runner, then the fixed-mask fine-tune keeps the pruned
weights exactly zero and lowers the loss."""

import torch

from scripts.llm_recover import block_masks, fixed_mask_finetune, measured_sparsity, parse_args, prune_model
from tests.test_llm_text import tiny_llama


def test_fixed_mask_finetune_keeps_the_mask_and_learns(tmp_path):
    model = tiny_llama(7)
    ids = torch.randint(0, 40, (200,), generator=torch.Generator().manual_seed(0))
    args = parse_args(["--out", str(tmp_path), "--calib", "4", "--seqlen", "12", "--batch-size", "4"])
    row = prune_model(model, ids, "sparsegpt", "2:4", args)
    assert (row["sparsity"], row["pattern"]) == (0.5, "2:4")
    masks = block_masks(model)
    assert len(masks) == 2 * 7 and measured_sparsity(model) == 0.5
    x = ids[:24].reshape(2, 12)
    losses = fixed_mask_finetune(model, x.repeat(10, 1), masks, lr=1e-2, batch_size=2, warmup=1)
    assert len(losses) == 10 and losses[-1] < losses[0]
    for name, keep in masks.items():
        w = model.get_submodule(name).weight
        assert torch.equal(w != 0, keep), name  # the same 2:4 pattern, pruned weights exactly zero
    assert not model.training
