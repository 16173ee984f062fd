"""N:M scores: Wanda input norms, movement scores, and the second-order (OBS) N:M selection and update."""

import itertools

import pytest
import torch
from helpers import tiny_bert
from torch import nn

from prune_trainer.callbacks.nm import NMSparsityCallback
from prune_trainer.config import PruningConfig
from prune_trainer.masking.masked_linear import MaskedLinear
from prune_trainer.masking.selection import nm_mask
from prune_trainer.methods.nm_scores import (
    collect_input_norms,
    movement_nm_scores,
    obert_nm_masks,
    obs_nm_select,
    wanda_nm_scores,
)
from prune_trainer.schedules.schedule import PruningSchedule


class Toy(nn.Module):
    """Embedding → MaskedLinear, so the linear's input is known exactly (rows of the embedding)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 8)
        self.lin = MaskedLinear(8, 4)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.lin(self.emb(input_ids))
        loss = None if labels is None else ((logits - labels) ** 2).sum()
        return {"loss": loss, "logits": logits}


def test_input_norms_skip_padding_and_match_embedding_rows():
    toy = Toy()
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    am = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    norms = collect_input_norms(toy, {"lin": toy.lin}, [{"input_ids": ids, "attention_mask": am}])
    rows = toy.emb.weight.detach()[[1, 2, 3, 4, 5]]
    torch.testing.assert_close(norms["lin"], rows.pow(2).sum(0).sqrt())


def test_wanda_changes_the_nm_choice_against_magnitude():
    layer = MaskedLinear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    scores = wanda_nm_scores({"l": layer}, {"l": torch.tensor([10.0, 10.0, 1.0, 1.0])})
    torch.testing.assert_close(scores["l"], torch.tensor([[10.0, 20.0, 3.0, 4.0]]))
    assert nm_mask(scores["l"], 2, 4).tolist() == [[True, True, False, False]]
    assert nm_mask(layer.weight.abs(), 2, 4).tolist() == [[False, False, True, True]]
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        wanda_nm_scores({"l": layer}, {"l": torch.ones(3)})


def test_movement_scores_needed_and_used():
    layer = MaskedLinear(8, 2)
    with pytest.raises(ValueError, match="movement scores"):
        movement_nm_scores({"l": layer})
    layer.mask_scores = nn.Parameter(torch.randn(2, 8))
    assert torch.equal(movement_nm_scores({"l": layer})["l"], layer.mask_scores.detach())


def _random_finv(nb, b, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(nb, b, b, generator=g, dtype=dtype)
    f = a @ a.transpose(1, 2) + 0.5 * torch.eye(b, dtype=dtype)
    return torch.linalg.inv(f), f


def test_obs_select_is_the_brute_force_minimiser_per_group():
    out_f, in_f, bsz, n, m = 3, 16, 8, 2, 4
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(1))
    finv, _ = _random_finv(out_f * in_f // bsz, bsz)
    keep = obs_nm_select(w, finv, n, m)
    for r in range(out_f):
        for g in range(in_f // m):
            block = (r * in_f + g * m) // bsz
            off = (g * m) % bsz
            sub = finv[block, off : off + m, off : off + m]
            wg = w[r, g * m : (g + 1) * m]
            best = min(
                itertools.combinations(range(m), m - n),
                key=lambda q: float(0.5 * wg[list(q)] @ torch.linalg.inv(sub[list(q)][:, list(q)]) @ wg[list(q)]),
            )
            expected = [i not in best for i in range(m)]
            assert keep[r, g * m : (g + 1) * m].tolist() == expected, (r, g)


def test_obs_select_with_identity_fisher_is_magnitude():
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    finv = torch.eye(8).expand(8, 8, 8).clone()
    assert torch.equal(obs_nm_select(w, finv, 2, 4), nm_mask(w.abs(), 2, 4))


class StubSampler:
    """Yields fixed gradients, like `GradientSampler.sample` (one list of flat grads per mini-batch)."""

    world_size = 1

    def __init__(self, grads):
        self.grads = grads

    def sample(self, model, params, num_batches, round_key=0, masks=None):
        assert num_batches == len(self.grads)
        for g in self.grads:
            yield [g]


def test_obert_nm_masks_select_and_update_match_closed_form():
    """Against an independent computation: F = GᵀG/m + λI per block of B, N:M set per group minimising
    ½ w_Qᵀ([F⁻¹]_QQ)⁻¹ w_Q, update δw = −F⁻¹_{:,Q}(F⁻¹_QQ)⁻¹ w_Q; the result also minimises ½ δwᵀFδw
    subject to w_Q = 0 (zero gradient on the kept coordinates)."""
    torch.manual_seed(4)
    layer = MaskedLinear(16, 2, bias=False)
    w0 = layer.weight.detach().clone()
    num, bsz, lam = 12, 8, 1e-2
    grads = [torch.randn(32) for _ in range(num)]
    masks = obert_nm_masks(nn.Identity(), {"l": layer}, StubSampler(grads), num, bsz, 2, 4, damp=lam)
    keep = masks["l"]
    g = torch.stack(grads).double().reshape(num, -1, bsz).transpose(0, 1)  # [S, m, B]
    f = g.transpose(1, 2) @ g / num + lam * torch.eye(bsz, dtype=torch.float64)
    finv = torch.linalg.inv(f)
    assert torch.equal(keep, obs_nm_select(w0.double(), finv, 2, 4))
    assert int((~keep).reshape(2, 4, 4).sum(-1).min()) == 2
    w = w0.double().reshape(-1, bsz)
    expected = torch.empty_like(w)
    for b in range(w.shape[0]):
        q = (~keep).reshape(-1, bsz)[b].nonzero().squeeze(1)
        dw = -finv[b][:, q] @ torch.linalg.solve(finv[b][q][:, q], w[b, q])
        expected[b] = w[b] + dw
        expected[b, q] = 0.0
    new = layer.weight.detach().double().reshape(-1, bsz)
    torch.testing.assert_close(new, expected, atol=1e-4, rtol=1e-4)
    grad = torch.bmm(f, (new - w).unsqueeze(2)).squeeze(2)
    assert float(grad[keep.reshape(-1, bsz)].abs().max()) < 1e-3 * float(grad.abs().max())


def test_obert_nm_masks_block_must_divide_rows():
    with pytest.raises(ValueError, match="block_size 8 does not divide in_features=12"):
        obert_nm_masks(nn.Identity(), {"l": MaskedLinear(12, 2)}, StubSampler([]), 1, 8, 2, 4)


def test_obert_score_in_callback_prunes_2_4_and_updates_kept_weights(tmp_path):
    from helpers import make_trainer

    model = tiny_bert()
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    config = PruningConfig(
        method="nm", schedule=PruningSchedule(kind="oneshot"),
        options={"score": "obert", "calib_batches": 4, "calib_batch_size": 4, "block_size": 8, "damp": 1e-9},
    )
    pruner = NMSparsityCallback(model, config)
    make_trainer(tmp_path, model, [pruner], max_steps=1, learning_rate=0.0).train()
    for name, layer in pruner.layers.items():
        w = layer.weight.detach()
        assert int((w != 0).reshape(w.shape[0], -1, 4).sum(-1).max()) <= 2, name
        kept = layer.weight_mask
        assert not torch.allclose(w[kept], before[name][kept]), f"no OBS update in {name}"


def test_sparsegpt_score_in_callback_prunes_2_4_and_reconstructs(tmp_path):
    from helpers import make_trainer

    model = tiny_bert()
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    config = PruningConfig(
        method="nm", schedule=PruningSchedule(kind="oneshot"),
        options={"score": "sparsegpt", "calib_batches": 2, "calib_batch_size": 8},
    )
    pruner = NMSparsityCallback(model, config)
    make_trainer(tmp_path, model, [pruner], max_steps=1, learning_rate=0.0).train()
    for name, layer in pruner.layers.items():
        w = layer.weight.detach()
        assert int((w != 0).reshape(w.shape[0], -1, 4).sum(-1).max()) <= 2, name
        assert bool((w[~layer.weight_mask] == 0).all())
        kept = layer.weight_mask
        assert not torch.allclose(w[kept], before[name][kept]), f"no SparseGPT reconstruction in {name}"


def test_sparsegpt_score_in_callback_is_exact_for_m_not_dividing_the_block(tmp_path):
    """1:3 with inputs of 96 and 192 (the 192-input layers span two 128-column SparseGPT blocks)."""
    from helpers import make_trainer

    model = tiny_bert(hidden_size=96, intermediate_size=192, num_hidden_layers=1)
    config = PruningConfig(
        method="nm", schedule=PruningSchedule(kind="oneshot"), pattern="1:3",
        options={"score": "sparsegpt", "calib_batches": 1, "calib_batch_size": 8},
    )
    pruner = NMSparsityCallback(model, config)
    make_trainer(tmp_path, model, [pruner], max_steps=1, learning_rate=0.0).train()
    assert any(layer.in_features > 128 for layer in pruner.layers.values())
    for name, layer in pruner.layers.items():
        kept = layer.weight_mask.reshape(layer.out_features, -1, 3).sum(-1)
        assert bool((kept == 1).all()), name
        assert bool((layer.weight.detach()[~layer.weight_mask] == 0).all()), name
