"""LLM Surgeon (van der Ouderaa et al. 2024): Kronecker algebra against brute force on an explicit ``G ⊗ A``, KFAC
factors against per-token gradients, and the whole-model procedure (sparsity, N:M, structures, shots, memory)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import synthetic_sentences, tiny_bert, tiny_tokenizer

from prune_trainer.cli import main
from prune_trainer.data.conll import Sentence
from prune_trainer.data.tokenize import IGNORE_INDEX
from prune_trainer.export.structured import load_pruned_model
from prune_trainer.masking.inject import find_target_linears
from prune_trainer.oneshot import llm_surgeon as ls
from prune_trainer.oneshot.calibration import labelled_calibration_batches
from prune_trainer.oneshot.kfac import collect_kfac, damped, plan_passes
from prune_trainer.oneshot.runner import OneShotConfig
from prune_trainer.oneshot.surgeon import SurgeonOptions, surgeon_prune
from prune_trainer.structures import find_structures, group_reduce, kept_groups

D = torch.float64


def spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2 * n, generator=g, dtype=D)
    return x @ x.T / (2 * n) + 0.1 * torch.eye(n, dtype=D)


def a1(W: torch.Tensor, F: torch.Tensor, K: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The general solution (eq. 15, 16) by brute force: cost and the pruned weights for the removed set ``K``
    (a boolean mask of W's shape), with ``F`` the explicit ``RC × RC`` curvature (row-major)."""
    theta = W.reshape(-1)
    E = torch.eye(theta.numel(), dtype=D)[K.reshape(-1)]
    f_inv = torch.linalg.inv(F)
    S = E @ f_inv @ E.T
    u = torch.linalg.solve(S, E @ theta)
    return float(0.5 * (E @ theta) @ u), (theta - f_inv @ E.T @ u).view_as(W)


@pytest.fixture
def layer():
    torch.manual_seed(0)
    R, C = 5, 6
    return torch.randn(R, C, dtype=D), spd(R, 1), spd(C, 2)


def test_kronecker_inverse_matches_the_explicit_inverse(layer):
    _, G, A = layer
    g_inv, a_inv = ls.kron_inverse(G, A)
    torch.testing.assert_close(torch.kron(g_inv, a_inv), torch.linalg.inv(torch.kron(G, A)))


def test_element_costs_equal_the_general_solution(layer):
    W, G, A = layer
    g_inv, a_inv = ls.kron_inverse(G, A)
    costs = ls.element_costs(W, g_inv, a_inv)
    for r, c in [(0, 0), (2, 3), (4, 5)]:
        K = torch.zeros_like(W, dtype=torch.bool)
        K[r, c] = True
        cost, _ = a1(W, torch.kron(G, A), K)
        assert costs[r, c].item() == pytest.approx(cost, rel=1e-10)


def test_row_group_cost_and_correlated_update_equal_the_general_solution(layer):
    W, G, A = layer
    g_inv, _ = ls.kron_inverse(G, A)
    index = torch.tensor([[0, 3], [1, 2]])  # two groups of two rows
    costs = ls.row_group_costs(W, A, g_inv, index)
    for b in range(2):
        K = torch.zeros_like(W, dtype=torch.bool)
        K[index[b]] = True
        cost, expected = a1(W, torch.kron(G, A), K)
        assert costs[b].item() == pytest.approx(cost, rel=1e-10)
    rows = torch.tensor([0, 3, 4])  # many rows at once (eq. 27)
    K = torch.zeros_like(W, dtype=torch.bool)
    K[rows] = True
    torch.testing.assert_close(ls.remove_rows(W, g_inv, rows), a1(W, torch.kron(G, A), K)[1])
    single = ls.row_group_costs(W, A, g_inv, torch.tensor([[2]]))  # one row: ½ θᵀAθ / [G⁻¹]_rr (eq. 20)
    assert single.item() == pytest.approx(0.5 * float(W[2] @ A @ W[2]) / float(g_inv[2, 2]), rel=1e-12)


def test_column_group_cost_and_correlated_update_equal_the_general_solution(layer):
    W, G, A = layer
    _, a_inv = ls.kron_inverse(G, A)
    index = torch.tensor([[1, 4], [0, 5]])
    costs = ls.col_group_costs(W, G, a_inv, index)
    for b in range(2):
        K = torch.zeros_like(W, dtype=torch.bool)
        K[:, index[b]] = True
        assert costs[b].item() == pytest.approx(a1(W, torch.kron(G, A), K)[0], rel=1e-10)
    cols = torch.tensor([1, 2, 5])  # eq. 28
    K = torch.zeros_like(W, dtype=torch.bool)
    K[:, cols] = True
    torch.testing.assert_close(ls.remove_cols(W, a_inv, cols), a1(W, torch.kron(G, A), K)[1])
    single = ls.col_group_costs(W, G, a_inv, torch.tensor([[3]]))
    assert single.item() == pytest.approx(0.5 * float(W[:, 3] @ G @ W[:, 3]) / float(a_inv[3, 3]), rel=1e-12)


def test_masked_update_of_many_elements_equals_the_general_solution(layer):
    W, G, A = layer
    K = torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    new, iters = ls.masked_update(W, G, A, K, max_iter=500, tol=1e-13)
    torch.testing.assert_close(new, a1(W, torch.kron(G, A), K)[1], atol=1e-9, rtol=1e-9)
    assert 0 < iters <= W.numel()
    assert bool((new[K] == 0).all())


def test_kobd_is_the_diagonal_special_case(layer):
    """K-OBD = the general solution with F diagonal within the removed structure: diag(G) ⊗ A for rows,
    G ⊗ diag(A) for columns, diag(G) ⊗ diag(A) for elements — and then its update only zeroes them."""
    W, G, A = layer
    dg, da = torch.diag(torch.diagonal(G)), torch.diag(torch.diagonal(A))
    rows, cols = torch.tensor([[1, 3]]), torch.tensor([[0, 2]])
    K = torch.zeros_like(W, dtype=torch.bool)
    K[rows[0]] = True
    cost, new = a1(W, torch.kron(dg, A), K)
    assert ls.row_group_costs_obd(W, A, G, rows).item() == pytest.approx(cost, rel=1e-10)
    torch.testing.assert_close(new, W.masked_fill(K, 0.0))
    K = torch.zeros_like(W, dtype=torch.bool)
    K[:, cols[0]] = True
    cost, new = a1(W, torch.kron(G, da), K)
    assert ls.col_group_costs_obd(W, G, A, cols).item() == pytest.approx(cost, rel=1e-10)
    torch.testing.assert_close(new, W.masked_fill(K, 0.0))
    K = torch.zeros_like(W, dtype=torch.bool)
    K[2, 4] = True
    assert ls.element_costs_obd(W, G, A)[2, 4].item() == pytest.approx(a1(W, torch.kron(dg, da), K)[0], rel=1e-10)


def test_damping_adds_a_fraction_of_the_mean_diagonal():
    M = spd(4, 5)
    out = damped(M, 0.1)
    torch.testing.assert_close(out - M, 0.1 * torch.diagonal(M).mean() * torch.eye(4, dtype=D))
    with pytest.raises(ValueError, match="damping fraction"):
        damped(M, -1.0)


# --- KFAC factors and the whole-model procedure ---------------------------------------------------------------


@pytest.fixture
def batches():
    sentences = [Sentence(t, g) for t, g in synthetic_sentences(24, seed=1)]
    return labelled_calibration_batches(sentences, tiny_tokenizer(), 16, batch_size=8)


def model4():
    return tiny_bert(num_attention_heads=4, intermediate_size=64)


def test_kfac_factors_equal_per_token_statistics(batches):
    """A = mean over real tokens of [a;1][a;1]ᵀ, G = mean of g gᵀ with g the per-token gradient of the summed
    cross-entropy w.r.t. the Linear's output (computed here with retain_grad)."""
    model = model4().eval()
    name = "bert.encoder.layer.1.intermediate.dense"
    f = collect_kfac(model, batches, [name])[name]
    lin = model.get_submodule(name)
    a_sum, g_sum, n = 0.0, 0.0, 0
    store: dict = {}
    for batch in batches:
        handle = lin.register_forward_hook(lambda m, i, o: store.update(a=i[0], out=o.retain_grad() or o))
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits
        handle.remove()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
        loss.backward()
        mask = batch["attention_mask"].bool()
        a = torch.cat([store["a"][mask], torch.ones(int(mask.sum()), 1)], 1).double()
        g = store["out"].grad[mask].double()
        a_sum, g_sum, n = a_sum + a.T @ a, g_sum + g.T @ g, n + int(mask.sum())
    torch.testing.assert_close(f.a(), a_sum / n)
    torch.testing.assert_close(f.g(), g_sum / n)
    sampled = collect_kfac(model, batches, [name], labels="sampled")[name]
    torch.testing.assert_close(sampled.a(), f.a())
    assert not torch.allclose(sampled.g(), f.g())


def zeros_per_layer(model, names):
    return {n: int((model.get_submodule(n).weight == 0).sum()) for n in names}


def test_unstructured_sparsity_is_exact_uniform_and_global(batches):
    for allocation in ("uniform", "global"):
        model = model4()
        names = find_target_linears(model)
        surgeon_prune(model, batches, "llm-surgeon", 0.6, names, options=SurgeonOptions(allocation=allocation),
                      progress=False)
        zeros = zeros_per_layer(model, names)
        sizes = {n: model.get_submodule(n).weight.numel() for n in names}
        if allocation == "uniform":
            assert zeros == {n: round(0.6 * s) for n, s in sizes.items()}
        else:
            assert sum(zeros.values()) == round(0.6 * sum(sizes.values()))


def test_update_false_only_zeroes_the_removed_weights(batches):
    model, reference = model4(), model4()
    names = find_target_linears(model)
    surgeon_prune(model, batches, "llm-surgeon", 0.5, names, progress=False, options=SurgeonOptions(update=False))
    for n in names:
        W, W0 = model.get_submodule(n).weight, reference.get_submodule(n).weight
        assert torch.equal(W[W != 0], W0[W != 0])
        assert torch.equal(model.get_submodule(n).bias, reference.get_submodule(n).bias)


def test_global_allocation_respects_the_layer_cap(batches):
    model = model4()
    names = find_target_linears(model)
    surgeon_prune(model, batches, "k-obd", 0.6, names, progress=False,
                  options=SurgeonOptions(allocation="global", max_layer_sparsity=0.7, shots=2))
    zeros = zeros_per_layer(model, names)
    sizes = {n: model.get_submodule(n).weight.numel() for n in names}
    assert sum(zeros.values()) == round(0.6 * sum(sizes.values()))
    assert all(zeros[n] <= int(0.7 * sizes[n]) for n in names)
    assert max(zeros[n] / sizes[n] for n in names) > 0.65  # the cap binds somewhere
    with pytest.raises(ValueError, match="below the target"):
        surgeon_prune(model, batches, "k-obd", 0.8, names, progress=False,
                      options=SurgeonOptions(max_layer_sparsity=0.7))


def test_nm_groups_and_monotone_shots(batches):
    model = model4()
    names = find_target_linears(model)
    surgeon_prune(model, batches, "llm-surgeon", 0.0, names, 2, 4, options=SurgeonOptions(shots=3), progress=False)
    for n in names:
        groups = (model.get_submodule(n).weight == 0).view(-1, 4).sum(1)
        assert bool((groups == 2).all()), n


def test_one_shot_equals_the_single_shot_computation(batches):
    """T = 1 through `surgeon_prune` = costs, one uniform threshold and the correlated update written out here."""
    model, reference = model4(), model4()
    names = find_target_linears(model)
    opts = SurgeonOptions(shots=1, allocation="uniform", cg_iters=50)
    surgeon_prune(model, batches, "llm-surgeon", 0.5, names, options=opts, progress=False)
    factors = collect_kfac(reference, batches, names)
    for n in names:
        lin = reference.get_submodule(n)
        G, A = damped(factors[n].g(), 0.01), damped(factors[n].a(), 0.01)
        W = torch.cat([lin.weight.detach().double(), lin.bias.detach().double()[:, None]], 1)
        g_inv, a_inv = ls.kron_inverse(G, A)
        cost = ls.element_costs(W, g_inv, a_inv)[:, :-1]
        pick = torch.zeros(cost.numel(), dtype=torch.bool)
        pick[torch.argsort(cost.reshape(-1), stable=True)[: round(0.5 * cost.numel())]] = True
        prune = torch.cat([pick.view(cost.shape), torch.zeros(cost.shape[0], 1, dtype=torch.bool)], 1)
        new, _ = ls.masked_update(W.float(), G.float(), A.float(), prune, 50, 1e-4)
        got = model.get_submodule(n)
        torch.testing.assert_close(got.weight, new[:, :-1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.bias, new[:, -1], atol=1e-5, rtol=1e-4)


def test_passes_under_a_memory_limit_give_the_same_result(batches, capsys):
    full, split = model4(), model4()
    names = find_target_linears(full)
    surgeon_prune(full, batches, "llm-surgeon", 0.5, names, options=SurgeonOptions(shots=2), progress=False)
    report = surgeon_prune(split, batches, "llm-surgeon", 0.5, names, progress=False,
                           options=SurgeonOptions(shots=2, memory_limit_mib=0.06))
    assert report.passes > 1
    assert "MiB" in capsys.readouterr().out
    for n in names:
        torch.testing.assert_close(split.get_submodule(n).weight, full.get_submodule(n).weight)


def test_factors_over_the_memory_limit_fail_before_any_work(batches):
    model = model4()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="over the memory limit"):
        surgeon_prune(model, batches, "llm-surgeon", 0.5, find_target_linears(model), progress=False,
                      options=SurgeonOptions(memory_limit_mib=0.01))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="over the memory limit"):
        plan_passes({"a": 10, "b": 100}, 50)
    assert plan_passes({"a": 10, "b": 30, "c": 25}, 50) == [["a", "b"], ["c"]]


@pytest.mark.parametrize("variant", ["llm-surgeon", "k-obd", "structured-obs", "structured-magnitude"])
def test_structures_remove_whole_heads_and_neurons(batches, variant):
    model = model4()
    report = surgeon_prune(model, batches, variant, 0.4, [], structures=["heads", "ffn"], progress=False,
                           options=SurgeonOptions(shots=2, allocation="uniform"))
    structures = find_structures(model)
    removed = 0
    for kind, groups in structures.groups.items():
        per_group = {}
        for lin in groups.linears:
            W = model.get_submodule(lin.name).weight
            nonzero = (W != 0).any(dim=1 - lin.axis)
            for g in lin.group_ids.unique().tolist():
                per_group.setdefault(g, []).append(bool(nonzero[lin.group_ids == g].any()))
        gone = [g for g, alive in per_group.items() if not any(alive)]
        assert all(all(alive) for g, alive in per_group.items() if g not in gone)  # a group goes whole or stays
        assert len(gone) == report.removed_groups[kind]
        removed += len(gone) * groups.weights_per_group
    assert report.removed_groups == {"heads": 2 * 2, "ffn": 2 * 26}  # per layer: round(0.4·4), round(0.4·64)


def test_structured_magnitude_removes_the_smallest_groups_by_l2_norm(batches):
    model = model4()
    groups = find_structures(model).groups["ffn"]
    norms = group_reduce(groups, {c.name: model.get_submodule(c.name).weight.detach() ** 2 for c in groups.linears})
    for c in groups.linears:  # a neuron's bias entry goes with its row
        if c.axis == 0:
            norms.index_add_(0, c.group_ids, model.get_submodule(c.name).bias.detach() ** 2)
    surgeon_prune(model, batches, "structured-magnitude", 0.25, [], structures=["ffn"], progress=False,
                  options=SurgeonOptions(allocation="uniform"))
    removed = ~kept_groups(groups, {c.name: model.get_submodule(c.name).weight for c in groups.linears})
    for off, size in zip(groups.layer_offsets(), groups.sizes, strict=True):
        expected = torch.argsort(norms[off : off + size])[: round(0.25 * size)]
        assert set((torch.nonzero(removed[off : off + size]).view(-1)).tolist()) == set(expected.tolist())


def test_cli_structured_export_reloads_smaller_and_equal(tiny_model_dir, conll_dir, tmp_path, capsys):
    tiny = tiny_bert(num_attention_heads=4, intermediate_size=64)
    tiny.save_pretrained(tiny_model_dir)
    out = tmp_path / "run"
    assert main(["oneshot", "--model", str(tiny_model_dir), "--method", "llm-surgeon", "--structure", "heads,ffn",
                 "--target", "0.3", "--shots", "2", "--calib-samples", "16", "--data-dir", str(conll_dir),
                 "--output-dir", str(out), "--device", "cpu"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["structures"] == ["heads", "ffn"] and res["surgeon"]["options"]["shots"] == 2
    small = load_pruned_model(out / "model")
    assert small.bert.encoder.layer[0].intermediate.dense.out_features == res["structure"]["ffn"][0] < 64
    assert "eval_f1" in res


def test_bad_options_fail_before_anything_runs(tiny_model_dir):
    with pytest.raises(ValueError, match="did you mean 'shots'"):
        OneShotConfig(model=str(tiny_model_dir), method="llm-surgeon", options={"shot": 2}).validate()
    with pytest.raises(ValueError, match="need an LLM Surgeon method"):
        OneShotConfig(model=str(tiny_model_dir), method="sparsegpt", structures=["heads"]).validate()
    with pytest.raises(ValueError, match="exclude each other"):
        OneShotConfig(model=str(tiny_model_dir), method="k-obd", structures=["ffn"], pattern="2:4").validate()
    with pytest.raises(ValueError, match="shots must be >= 1"):
        SurgeonOptions(shots=0)
