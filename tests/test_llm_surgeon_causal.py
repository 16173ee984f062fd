"""LLM Surgeon on causal LMs (van der Ouderaa et al. 2024 prune OPT and Llama with their next-token loss): KFAC
factors of a tiny random Llama against per-token gradients of HF's own shifted loss, exact sparsity / 2:4 / whole
KV-head groups, seeded sampled labels, and the one-shot CLI with perplexity."""

from __future__ import annotations

import json

import pytest
import torch
from family_models import VOCAB, tiny_batches, tiny_family_model
from helpers import tiny_tokenizer

from prune_trainer.cli import main
from prune_trainer.data.tokenize import IGNORE_INDEX
from prune_trainer.export.structured import load_pruned_model
from prune_trainer.masking.inject import find_target_linears
from prune_trainer.oneshot.calibration import next_token_labels
from prune_trainer.oneshot.kfac import collect_kfac
from prune_trainer.oneshot.runner import OneShotConfig, run_oneshot
from prune_trainer.oneshot.surgeon import SurgeonOptions, surgeon_prune
from prune_trainer.structures import find_structures


def llama():
    return tiny_family_model("llama")


def windows(n: int = 6, seqlen: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Unpadded random windows (as `window_batches` gives a causal LM), in batches of 3, with next-token labels."""
    ids = torch.randint(3, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    return next_token_labels([{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in ids.split(3)])


def test_next_token_labels_shift_and_skip_padding():
    batch = next_token_labels(tiny_batches("llama"))[0]  # right-padded rows of 7, 5 and 3 tokens
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    for row, n in enumerate([7, 5, 3]):
        assert batch["labels"][row, : n - 1].tolist() == ids[row, 1:n].tolist()
        assert bool((batch["labels"][row, n - 1 :] == IGNORE_INDEX).all())
        assert batch["token_mask"][row].tolist() == [True] * (n - 1) + [False] * (7 - n + 1)
    assert torch.equal(batch["attention_mask"].bool(), mask)  # the model still reads every real token


def test_causal_kfac_factors_equal_per_token_gradients_of_the_shifted_loss():
    """A, G = means over the positions that have a next token of [a][a]ᵀ and g gᵀ, g the per-token gradient of HF's
    own causal-LM loss (labels = input_ids with padding −100, shifted inside the model) times its token count."""
    model = llama()
    name = "model.layers.1.mlp.down_proj"
    raw = tiny_batches("llama")  # padded, so the padding and last positions must be left out
    f = collect_kfac(model, next_token_labels(raw), [name])[name]
    lin = model.get_submodule(name)
    a_sum, g_sum, n = 0.0, 0.0, 0
    store: dict = {}
    for batch in raw:
        hf_labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        handle = lin.register_forward_hook(lambda m, i, o: store.update(a=i[0], out=o.retain_grad() or o))
        out = model(**batch, labels=hf_labels)
        handle.remove()
        counted = hf_labels[:, 1:] != IGNORE_INDEX
        (out.loss * int(counted.sum())).backward()  # HF averages over the predicted tokens: back to the sum
        mask = torch.cat([counted, torch.zeros_like(counted[:, :1])], 1)
        a, g = store["a"][mask].double(), store["out"].grad[mask].double()
        a_sum, g_sum, n = a_sum + a.T @ a, g_sum + g.T @ g, n + int(mask.sum())
    assert f.n == n == (7 - 1) + (5 - 1) + (3 - 1) + 2 * (6 - 1)
    torch.testing.assert_close(f.a(), a_sum / n)
    torch.testing.assert_close(f.g(), g_sum / n)


def test_sampled_labels_are_deterministic_with_the_seed():
    model, batches = llama(), windows()
    names = find_target_linears(model)
    empirical = collect_kfac(model, batches, names[:2])
    first = collect_kfac(model, batches, names[:2], labels="sampled", seed=3)
    again = collect_kfac(model, batches, names[:2], labels="sampled", seed=3)
    other = collect_kfac(model, batches, names[:2], labels="sampled", seed=4)
    for n in names[:2]:
        assert torch.equal(first[n].g_sum, again[n].g_sum)
        assert not torch.allclose(first[n].g(), other[n].g())
        assert not torch.allclose(first[n].g(), empirical[n].g())
        torch.testing.assert_close(first[n].a(), empirical[n].a())
    pruned = []
    for _ in range(2):
        m = llama()
        surgeon_prune(m, batches, "llm-surgeon", 0.5, names, options=SurgeonOptions(labels="sampled", seed=3),
                      progress=False)
        pruned.append(m.state_dict())
    assert all(torch.equal(pruned[0][k], pruned[1][k]) for k in pruned[0])


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_unstructured_and_nm_sparsity_on_a_causal_lm_are_exact(allocation):
    batches = windows()
    model = llama()
    names = find_target_linears(model)
    assert len(names) == 14  # q, k, v, o, gate, up, down of 2 decoder layers
    surgeon_prune(model, batches, "llm-surgeon", 0.5, names, options=SurgeonOptions(allocation=allocation, shots=2),
                  progress=False)
    zeros = {n: int((model.get_submodule(n).weight == 0).sum()) for n in names}
    sizes = {n: model.get_submodule(n).weight.numel() for n in names}
    if allocation == "uniform":
        assert zeros == {n: round(0.5 * s) for n, s in sizes.items()}
    else:
        assert sum(zeros.values()) == round(0.5 * sum(sizes.values()))
    model = llama()
    surgeon_prune(model, batches, "llm-surgeon", 0.0, names, 2, 4, options=SurgeonOptions(allocation=allocation),
                  progress=False)
    for n in names:
        assert bool(((model.get_submodule(n).weight == 0).view(-1, 4).sum(1) == 2).all()), n


def test_kv_head_groups_and_neurons_go_whole_on_llama():
    """GQA: a head group = one KV head's k/v rows, its query heads' q rows and their o columns."""
    model = llama()
    report = surgeon_prune(model, windows(), "llm-surgeon", 0.5, [], structures=["heads", "ffn"], progress=False,
                           options=SurgeonOptions(allocation="uniform"))
    assert report.removed_groups == {"heads": 2 * 1, "ffn": 2 * 16}  # per layer: round(0.5·2) of 2, 16 of 32
    for groups in find_structures(model).groups.values():
        for lin in groups.linears:
            alive = (model.get_submodule(lin.name).weight != 0).any(dim=1 - lin.axis)
            for g in lin.group_ids.unique():
                assert alive[lin.group_ids == g].all() or not alive[lin.group_ids == g].any()


def test_memory_limit_passes_on_a_causal_lm_give_the_same_result(capsys):
    batches = windows()
    full, split = llama(), llama()
    names = find_target_linears(full)
    surgeon_prune(full, batches, "llm-surgeon", 0.5, names, progress=False)
    report = surgeon_prune(split, batches, "llm-surgeon", 0.5, names, progress=False,
                           options=SurgeonOptions(memory_limit_mib=0.02))
    assert report.passes > 1 and "calibration pass(es)" in capsys.readouterr().out
    for n in names:
        torch.testing.assert_close(split.get_submodule(n).weight, full.get_submodule(n).weight)


def _save_llama(path):
    llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_cli_llm_surgeon_on_a_causal_lm_writes_perplexity(tmp_path, conll_dir, capsys):
    path = _save_llama(tmp_path / "llama")
    out = tmp_path / "run"
    assert main(["oneshot", "--model", str(path), "--task", "causal-lm", "--method", "llm-surgeon", "--structure",
                 "2:4", "--target", "0.5", "--shots", "2", "--calib-samples", "4", "--seqlen", "16",
                 "--eval-windows", "2", "--data-dir", str(conll_dir), "--output-dir", str(out),
                 "--device", "cpu"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "causal-lm" and res["sparsity"] == pytest.approx(0.5)
    assert res["calib_tokens"] == 4 * 15 and res["surgeon"]["options"]["shots"] == 2
    assert res["eval_perplexity"] > 1 and res["eval_windows"] == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_perplexity"] == res["eval_perplexity"]


def test_structured_causal_lm_run_exports_a_smaller_llama(tmp_path, conll_dir):
    path = _save_llama(tmp_path / "llama")
    cfg = OneShotConfig(model=str(path), task="causal-lm", method="k-obd", sparsity=0.4, structures=["heads", "ffn"],
                        calib_samples=4, max_length=16, eval_windows=2, data_dir=str(conll_dir),
                        output_dir=str(tmp_path / "run"), device="cpu")
    res = run_oneshot(cfg, progress=False)
    small = load_pruned_model(tmp_path / "run" / "model")
    assert small.model.layers[0].mlp.up_proj.out_features == res["structure"]["ffn"][0] < 32
    attention = small.model.layers[0].self_attn  # one of 2 KV groups gone: 2 of 4 query heads, 1 of 2 KV heads
    assert (attention.q_proj.out_features, attention.k_proj.out_features) == (2 * 4, 1 * 4)
    assert res["eval_perplexity"] > 1


def test_surgeon_still_refuses_other_tasks(tmp_path):
    with pytest.raises(ValueError, match="own loss on calibration batches"):
        OneShotConfig(model=str(tmp_path), method="llm-surgeon", task="seq2seq").validate()
