"""Per-layer one-shot pruners on random layers with known inputs X."""

from __future__ import annotations

import pytest
import torch

from prune_trainer.oneshot.base import LayerStats
from prune_trainer.oneshot.magnitude import magnitude_prune
from prune_trainer.oneshot.obs import obs_prune
from prune_trainer.oneshot.sparsegpt import sparsegpt_prune
from prune_trainer.oneshot.wanda import wanda_prune

METHODS = {"obs": obs_prune, "sparsegpt": sparsegpt_prune, "wanda": wanda_prune, "magnitude": magnitude_prune}


def random_layer(seed: int, rows: int = 16, cols: int = 32, tokens: int = 256, dtype=torch.float64):
    """Correlated inputs with uneven feature scales (where Wanda and the OBS updates matter)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(cols, generator=g, dtype=dtype))
    X = (torch.randn(tokens, cols, generator=g, dtype=dtype) @ torch.randn(cols, cols, generator=g, dtype=dtype))
    X = X * scales
    W = torch.randn(rows, cols, generator=g, dtype=dtype)
    return W, X, LayerStats.from_inputs(X)


def recon_error(W, W_hat, X) -> float:
    return float(((W - W_hat.to(W.dtype)) @ X.T).norm())


def brute_force_obs(W: torch.Tensor, H: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Greedy OBS by explicit inverses and least-squares re-solves (no downdates)."""
    out = torch.zeros_like(W)
    d = W.shape[1]
    for r in range(W.shape[0]):
        w0, keep, w = W[r], list(range(d)), W[r].clone()
        for _ in range(n_prune):
            hinv = torch.linalg.inv(H[keep][:, keep])
            j = keep[int((w[keep] ** 2 / torch.diagonal(hinv)).argmin())]
            keep.remove(j)
            w = torch.zeros(d, dtype=W.dtype)
            w[keep] = torch.linalg.solve(H[keep][:, keep], (H @ w0)[keep])
        out[r] = w
    return out


@pytest.mark.parametrize("lazy", [1, 3, 64])
def test_obs_equals_brute_force_sequential_solve(lazy):
    W, X, stats = random_layer(0, rows=4, cols=10, tokens=40)
    W_obs, keep = obs_prune(W, stats, 0.6, lazy=lazy, dtype=torch.float64, chunk_bytes=2 * 10 * 10 * 8 * 2)
    H = 2.0 * X.T @ X / X.shape[0]
    H = H + 0.01 * torch.diagonal(H).mean() * torch.eye(10, dtype=H.dtype)
    expected = brute_force_obs(W, H, 6)
    torch.testing.assert_close(W_obs, expected, rtol=1e-8, atol=1e-10)
    assert torch.equal(keep, expected != 0)


def test_obs_equals_brute_force_through_repeated_shrinking():
    """18 of 24 inputs pruned two at a time: the pruned positions are dropped from H⁻¹ four times."""
    W, X, stats = random_layer(3, rows=3, cols=24, tokens=96)
    W_before = W.clone()
    W_obs, keep = obs_prune(W, stats, 0.75, lazy=2, dtype=torch.float64)
    assert torch.equal(W, W_before)  # the caller's weight is not updated in place
    H = 2.0 * X.T @ X / X.shape[0]
    H = H + 0.01 * torch.diagonal(H).mean() * torch.eye(24, dtype=H.dtype)
    expected = brute_force_obs(W, H, 18)
    torch.testing.assert_close(W_obs, expected, rtol=1e-7, atol=1e-9)
    assert torch.equal(keep, expected != 0)


@pytest.mark.parametrize("lazy", [1, 32])
def test_obs_nm_equals_constrained_brute_force(lazy):
    W, X, stats = random_layer(1, rows=3, cols=8, tokens=40)
    W_obs, keep = obs_prune(W, stats, 0.0, prunen=2, prunem=4, lazy=lazy, dtype=torch.float64)
    assert (keep.reshape(3, 2, 4).sum(-1) == 2).all()
    # The remaining weights are the exact least-squares re-fit on the kept support.
    H = 2.0 * X.T @ X / X.shape[0]
    H = H + 0.01 * torch.diagonal(H).mean() * torch.eye(8, dtype=H.dtype)
    for r in range(3):
        k = keep[r]
        refit = torch.linalg.solve(H[k][:, k], (H @ W[r])[k])
        torch.testing.assert_close(W_obs[r, k], refit, rtol=1e-8, atol=1e-10)


def test_reconstruction_error_ordering_on_average():
    errs = {name: 0.0 for name in METHODS}
    for seed in range(6):
        W, X, stats = random_layer(seed, rows=32, cols=64, tokens=512, dtype=torch.float32)
        for name, fn in METHODS.items():
            W_hat, _ = fn(W, stats, 0.6)
            errs[name] += recon_error(W.double(), W_hat, X.double())
    assert errs["obs"] <= errs["sparsegpt"] <= errs["wanda"] <= errs["magnitude"], errs


@pytest.mark.parametrize("name", ["obs", "wanda"])
@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.8])
def test_rowwise_methods_exact_sparsity_per_row(name, sparsity):
    W, _, stats = random_layer(2, rows=8, cols=40, dtype=torch.float32)
    W_hat, keep = METHODS[name](W, stats, sparsity)
    pruned = (~keep).sum(1)
    assert (pruned == round(sparsity * 40)).all()
    assert torch.equal(W_hat == 0, ~keep)


@pytest.mark.parametrize("name", ["sparsegpt", "magnitude"])
def test_layerwise_methods_exact_sparsity_per_layer(name):
    W, _, stats = random_layer(3, rows=8, cols=128, dtype=torch.float32)
    W_hat, keep = METHODS[name](W, stats, 0.7)
    assert int((~keep).sum()) == pytest.approx(0.7 * W.numel(), abs=2)
    assert (W_hat[~keep] == 0).all()


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_groups_exact(name, n, m):
    W, _, stats = random_layer(4, rows=6, cols=32, dtype=torch.float32)
    W_hat, keep = METHODS[name](W, stats, 0.0, prunen=n, prunem=m)
    assert (keep.reshape(6, 32 // m, m).sum(-1) == n).all()
    assert (W_hat[~keep] == 0).all()


def test_wanda_matches_independent_score():
    W, X, stats = random_layer(5, rows=4, cols=16, dtype=torch.float32)
    _, keep = wanda_prune(W, stats, 0.5)
    score = W.abs() * X.norm(dim=0)
    expected = score >= score.sort(dim=1).values[:, 8:9]
    assert torch.equal(keep, expected)


def test_sparsegpt_keeps_unpruned_weights_when_sparsity_zero_and_updates_otherwise():
    W, X, stats = random_layer(6, rows=4, cols=16, dtype=torch.float32)
    W0, keep0 = sparsegpt_prune(W, stats, 0.0)
    assert keep0.all() and torch.allclose(W0, W)
    W5, keep5 = sparsegpt_prune(W, stats, 0.5)
    assert not torch.allclose(W5[keep5], W[keep5])  # the OBS-style update moved the kept weights


@pytest.mark.parametrize("name", ["obs", "sparsegpt", "wanda"])
def test_empty_calibration_data_is_an_error(name):
    W = torch.randn(4, 8)
    with pytest.raises(ValueError, match="empty calibration data"):
        METHODS[name](W, LayerStats.empty(8, full=True), 0.5)


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_out_of_range_is_an_error(name, bad):
    W, _, stats = random_layer(7, rows=4, cols=8, dtype=torch.float32)
    with pytest.raises(ValueError, match=str(bad)):
        METHODS[name](W, stats, bad)


@pytest.mark.parametrize("name", list(METHODS))
def test_bad_nm_pattern_is_an_error(name):
    W, _, stats = random_layer(8, rows=4, cols=10, dtype=torch.float32)
    with pytest.raises(ValueError, match="2:4"):
        METHODS[name](W, stats, 0.0, prunen=2, prunem=4)  # 4 does not divide 10


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("nm", [(0, 0), (2, 4)])
def test_pruners_create_their_tensors_on_the_weights_device(name, nm):
    """With meta as the default device, any tensor made without ``device=`` lands on meta and mixing it with
    the CPU weight raises (or leaks a meta output): the way a CPU-only CI catches code that would break on CUDA."""
    W, _, stats = random_layer(4, rows=8, cols=16, tokens=64, dtype=torch.float32)
    expected = METHODS[name](W, stats, 0.5, *nm)
    with torch.device("meta"):
        W_hat, keep = METHODS[name](W, stats, 0.5, *nm)
    assert W_hat.device.type == keep.device.type == "cpu"
    torch.testing.assert_close(W_hat, expected[0])
    assert torch.equal(keep, expected[1])


def reference_sparsegpt_nm(W: torch.Tensor, stats: LayerStats, n: int, m: int, percdamp: float = 0.01):
    """SparseGPT N:M without lazy blocks (Frantar & Alistarh 2023, Alg. 1 with B = 1): at the first column of each
    group of M, prune the M−N smallest ``w²/U_jj²`` of the row; then ``W[:, j:] −= e U[j, j:]`` for every column."""
    from prune_trainer.oneshot.base import prepare_hessian

    H, W = prepare_hessian(stats.hessian(), W, percdamp)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    d = torch.diagonal(U)
    keep = torch.ones_like(W, dtype=torch.bool)
    for j in range(W.shape[1]):
        if j % m == 0:
            idx = torch.topk(W[:, j : j + m].square() / d[j : j + m].square(), m - n, dim=1, largest=False).indices
            keep[:, j : j + m].scatter_(1, idx, False)
        err = torch.where(keep[:, j], 0.0, W[:, j]) / d[j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    return W * keep, keep


NM_ANY_M = [(n, m) for m in range(2, 9) for n in sorted({1, m // 2, (m + 1) // 2, m - 1})]


@pytest.mark.parametrize("n,m", NM_ANY_M)
def test_sparsegpt_nm_exact_when_m_does_not_divide_the_block(n, m):
    """Groups of M must not straddle the 128-column lazy blocks (1:3 on 384 inputs, 2:6, 3:5 on 160, ...)."""
    cols = 384 if 384 % m == 0 else 32 * m  # 160 for M = 5, 224 for M = 7: not multiples of the 128-column block
    W, _, stats = random_layer(8, rows=6, cols=cols, tokens=512, dtype=torch.float32)
    W_hat, keep = sparsegpt_prune(W, stats, 0.0, prunen=n, prunem=m)
    assert (keep.reshape(6, cols // m, m).sum(-1) == n).all()
    assert (W_hat[~keep] == 0).all()
    W_ref, keep_ref = reference_sparsegpt_nm(W, stats, n, m)
    assert torch.equal(keep, keep_ref)
    torch.testing.assert_close(W_hat, W_ref, rtol=1e-4, atol=1e-4)
