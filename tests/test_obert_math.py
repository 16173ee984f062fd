"""oBERT math: block Fisher inverse (Woodbury = direct = brute force), OBS scores and joint update."""

import pytest
import torch

from prune_trainer.methods.obert.fisher import BlockFisherInverse, fisher_inverse_bytes, to_blocks
from prune_trainer.methods.obert.update import joint_update_blocks, obs_scores, obs_update, summed_update_blocks


def _reference_blocks(grads: torch.Tensor, block_size: int, damp: float) -> torch.Tensor:
    """inv(λI + (1/m) Σ g gᵀ) per block, in float64, one block at a time (independent of the code under test)."""
    m, d = grads.shape
    g = grads.double()
    out = []
    for start in range(0, d, block_size):
        gb = g[:, start : start + block_size]
        b = gb.shape[1]
        full = torch.zeros(block_size, block_size, dtype=torch.float64)
        full[:b, :b] = gb.T @ gb / m
        full += damp * torch.eye(block_size, dtype=torch.float64)
        out.append(torch.linalg.inv(full))
    return torch.stack(out)


@pytest.mark.parametrize("form", ["woodbury", "direct"])
@pytest.mark.parametrize("block_size", [1, 4, 7])
def test_fisher_inverse_matches_brute_force(form, block_size):
    torch.manual_seed(0)
    m, d, damp = 24, 30, 0.05  # d=30 is not a multiple of 4 or 7: padded tail block
    grads = torch.randn(m, d) * 0.3
    finv = BlockFisherInverse(d, block_size, m, damp, form)
    finv.add_grads(grads[:10])  # in two chunks
    finv.add_grads(grads[10:])
    finv.finalize()
    ref = _reference_blocks(grads, block_size, damp)
    got = finv.matrix_blocks().double()
    if block_size == 1:
        got = got.view(-1, 1, 1)
    torch.testing.assert_close(got, ref, rtol=2e-4, atol=1e-4)
    torch.testing.assert_close(finv.diag().double(), ref.diagonal(dim1=1, dim2=2).reshape(-1)[:d], rtol=2e-4, atol=1e-4)
    v = torch.randn(d)
    ref_mv = torch.bmm(ref, to_blocks(v.double(), block_size).unsqueeze(2)).reshape(-1)[:d]
    torch.testing.assert_close(finv.mul(v).double(), ref_mv, rtol=2e-4, atol=1e-3)


def test_woodbury_and_direct_agree_to_float32_precision():
    torch.manual_seed(1)
    m, d, B = 64, 500, 50
    grads = torch.randn(m, d) * 1e-2
    forms = {}
    for form in ("woodbury", "direct"):
        f = BlockFisherInverse(d, B, m, damp=1e-4, form=form)
        f.add_grads(grads)
        forms[form] = f.finalize().matrix_blocks()
    scale = forms["direct"].abs().max()
    assert (forms["woodbury"] - forms["direct"]).abs().max() / scale < 1e-4


def test_block_size_one_is_diagonal_and_linear_memory():
    d = 10_000
    f = BlockFisherInverse(d, 1, num_grads=3, damp=1.0)
    assert f.blocks.shape == (d,)  # O(d), not O(d·B)
    assert fisher_inverse_bytes(d, 1) == 4 * d and fisher_inverse_bytes(d, 50) == 4 * 200 * 2500
    g = torch.randn(3, d)
    f.add_grads(g)
    f.finalize()
    torch.testing.assert_close(f.diag(), 1.0 / (1.0 + g.square().mean(0)))


def test_lower_precision_storage_is_close():
    torch.manual_seed(2)
    grads = torch.randn(40, 120)
    full = BlockFisherInverse(120, 10, 40, 0.5)
    half = BlockFisherInverse(120, 10, 40, 0.5, dtype=torch.bfloat16)
    for f in (full, half):
        f.add_grads(grads)
        f.finalize()
    assert half.blocks.dtype == torch.bfloat16 and half.nbytes * 2 == full.nbytes
    torch.testing.assert_close(half.diag(), full.diag(), rtol=2e-2, atol=1e-3)


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="'cholesky'"):
        BlockFisherInverse(10, 5, 2, 1.0, form="cholesky")
    with pytest.raises(ValueError, match="-1"):
        BlockFisherInverse(10, 5, 2, damp=-1)
    f = BlockFisherInverse(10, 5, 2, 1.0)
    f.add_grads(torch.randn(1, 10))
    with pytest.raises(ValueError, match="num_grads=2"):
        f.finalize()


# ---- scores and updates on a quadratic model with a known Fisher ---------------------------------

def _known_fisher(d=12, B=6, seed=0):
    """A Fisher built from gradients, its exact block inverse, and the block matrices H (float64)."""
    torch.manual_seed(seed)
    m, damp = 40, 0.1
    grads = torch.randn(m, d)
    finv = BlockFisherInverse(d, B, m, damp)
    finv.add_grads(grads)
    finv.finalize()
    H = torch.linalg.inv(_reference_blocks(grads, B, damp))  # λI + GᵀG/m per block
    return finv, H


def _brute_force_min(H: torch.Tensor, w: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, float]:
    """argmin ½ δᵀHδ s.t. (w+δ)_Q = 0 by eliminating δ_Q = −w_Q and solving for the free coordinates."""
    R = ~Q
    delta = torch.zeros_like(w)
    delta[Q] = -w[Q]
    if R.any():
        delta[R] = -torch.linalg.solve(H[R][:, R], H[R][:, Q] @ delta[Q])
    return delta, float(0.5 * delta @ H @ delta)


def test_score_is_the_exact_loss_increase_of_pruning_one_weight():
    finv, H = _known_fisher()
    torch.manual_seed(5)
    w = torch.randn(2, 6)  # one block per row (d=12, B=6)
    scores = obs_scores(w, finv).double().reshape(-1)
    for i in range(12):
        b, j = divmod(i, 6)
        Q = torch.zeros(6, dtype=torch.bool)
        Q[j] = True
        _, loss = _brute_force_min(H[b], w.double().reshape(2, 6)[b], Q)
        assert scores[i].item() == pytest.approx(loss, rel=1e-4)


def test_joint_update_is_the_brute_force_constrained_minimiser():
    finv, H = _known_fisher(seed=3)
    torch.manual_seed(6)
    w = torch.randn(12)
    pruned = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 1], dtype=torch.bool)
    new = obs_update(w.view(3, 4), pruned.view(3, 4), finv, "joint").reshape(-1).double()
    summed = obs_update(w.view(3, 4), pruned.view(3, 4), finv, "summed").reshape(-1).double()
    wd = w.double()
    for b in range(2):
        sl = slice(6 * b, 6 * b + 6)
        delta, loss = _brute_force_min(H[b], wd[sl], pruned[sl])
        torch.testing.assert_close(new[sl] - wd[sl], delta, rtol=1e-4, atol=1e-5)
        # The summed single-weight form is feasible after re-zeroing but not optimal for |Q| > 1.
        ds = summed[sl] - wd[sl]
        assert float(0.5 * ds @ H[b] @ ds) >= loss - 1e-9
    assert bool((new[pruned] == 0).all()) and bool((summed[pruned] == 0).all())


def test_joint_equals_summed_for_one_pruned_weight_per_block():
    torch.manual_seed(7)
    a = torch.randn(5, 4, 4)
    finv_blocks = torch.linalg.inv(a @ a.transpose(1, 2) + torch.eye(4))
    w = torch.randn(5, 4)
    q = torch.zeros(5, 4, dtype=torch.bool)
    q[torch.arange(5), torch.randint(0, 4, (5,))] = True
    torch.testing.assert_close(joint_update_blocks(finv_blocks, w, q), summed_update_blocks(finv_blocks, w, q))


def test_update_does_not_touch_input_and_keeps_old_zeros():
    finv, _ = _known_fisher()
    w = torch.randn(3, 4)
    w[0, 0] = 0.0
    before = w.clone()
    pruned = torch.zeros(3, 4, dtype=torch.bool)
    pruned[0, 0] = pruned[1, 2] = True
    new = obs_update(w, pruned, finv, "joint", newly_pruned=pruned & (w != 0))
    assert torch.equal(w, before)
    assert new[0, 0] == 0 and new[1, 2] == 0
    assert not torch.equal(new, w.masked_fill(pruned, 0))  # remaining weights were compensated
    with pytest.raises(ValueError, match="'diag'"):
        obs_update(w, pruned, finv, "diag")
