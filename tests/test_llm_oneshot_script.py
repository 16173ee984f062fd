"""The Llama sequential runner of scripts/llm_oneshot.py: block replay equals a full forward (no cache grows),
pruning reaches the target per Linear, OWL allocations average to the target."""

import pytest
import torch
from torch import nn

from prune_trainer.oneshot.base import LayerStats
from prune_trainer.oneshot.wanda import wanda_prune
from scripts.llm_oneshot import (
    block_stats,
    capture_inputs,
    measured_sparsity,
    owl_block_sparsities,
    parse_setting,
    prune_llm_sequential,
    run_block,
)
from tests.test_llm_text import tiny_llama


def calib(n=4, seqlen=12, seed=0):
    return torch.randint(0, 40, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_sequential_replay_equals_full_forward():
    model, x = tiny_llama(), calib()
    hiddens, kwargs = capture_inputs(model, list(x.split(2)))
    assert all(kw.get("past_key_values") is None for kw in kwargs)
    for i, block in enumerate(model.model.layers):
        hiddens = [run_block(block, h, kwargs[i]) for h in hiddens]
    logits = torch.cat([model.lm_head(model.model.norm(h)) for h in hiddens])
    torch.testing.assert_close(logits, model(input_ids=x, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    # replaying a block twice with the recorded arguments gives the same output (no state carried between calls)
    h0, _ = capture_inputs(model, [x])
    torch.testing.assert_close(run_block(model.model.layers[0], h0[0], kwargs[0]),
                               run_block(model.model.layers[0], h0[0], kwargs[0]))


@torch.no_grad()
def test_prune_sequential_wanda_matches_reference_on_first_block():
    model, x = tiny_llama(1), calib(seed=1)
    hiddens, kwargs = capture_inputs(model, [x])
    stats, _ = block_stats(model.model.layers[0], hiddens, kwargs[0], full=False)
    q = model.model.layers[0].self_attn.q_proj.weight.clone()
    expected, _ = wanda_prune(q, stats["self_attn.q_proj"], 0.5)
    report = prune_llm_sequential(model, x, "wanda", 0.5, batch_size=2)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, expected)
    assert all(s == pytest.approx(0.5) for s in report["layer_sparsity"].values())
    assert len(report["layer_sparsity"]) == 2 * 7 and measured_sparsity(model) == pytest.approx(0.5)


@torch.no_grad()
def test_prune_sequential_sparsegpt_nm_and_magnitude():
    model = tiny_llama(2)
    prune_llm_sequential(model, calib(), "sparsegpt", 0.5, prunen=2, prunem=4, batch_size=4)
    w = model.model.layers[1].mlp.down_proj.weight
    assert int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2
    model = tiny_llama(2)
    prune_llm_sequential(model, calib(), "magnitude", 0.7)
    assert measured_sparsity(model) == pytest.approx(0.7, abs=0.01)
    with pytest.raises(ValueError, match="multiple of the batch size"):
        prune_llm_sequential(tiny_llama(), calib(n=3), "wanda", 0.5, batch_size=2)


@torch.no_grad()
def test_owl_block_sparsities_average_to_target():
    model = tiny_llama(3)
    sparsity, ratios = owl_block_sparsities(model, calib(), 0.6, batch_size=2, lam=0.1)
    assert set(sparsity) == {0, 1} and all(0.5 - 1e-6 <= s <= 0.7 + 1e-6 for s in sparsity.values())
    assert sum(sparsity.values()) / 2 == pytest.approx(0.6, abs=1e-4)  # the blocks have equal sizes
    assert all(0 <= r <= 1 for r in ratios.values())
    assert parse_setting("2:4") == (0.5, "2:4", 2, 4) and parse_setting("0.7") == (0.7, "unstructured", 0, 0)


def test_llama_stats_cover_every_linear():
    model, x = tiny_llama(), calib()
    hiddens, kwargs = capture_inputs(model, [x])
    stats, _ = block_stats(model.model.layers[0], hiddens, kwargs[0], full=True)
    names = {n for n, m in model.model.layers[0].named_modules() if isinstance(m, nn.Linear)}
    assert set(stats) == names and all(isinstance(s, LayerStats) and s.n_tokens == x.numel() for s in stats.values())


@pytest.mark.parametrize("method, nm", [("sparsegpt", (0, 0)), ("wanda", (2, 4))])
def test_script_runner_equals_the_library_runner(method, nm):
    """Two independent sequential runners (this script's and `prune_sequential` with the Llama preset) prune a tiny
    Llama to the same weights."""
    from prune_trainer.oneshot.calibration import prune_sequential
    from prune_trainer.oneshot.registry import get_method

    a, b, x = tiny_llama(4), tiny_llama(4), calib(n=4, seqlen=12, seed=5)
    prune_llm_sequential(a, x, method, 0.5, *nm, batch_size=2)
    batches = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in x.split(2)]
    prune_sequential(b, batches, get_method(method), 0.5, *nm, progress=False)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_markdown_table_and_row_keys(tmp_path):
    import json

    from scripts.llm_oneshot import load_rows, markdown_table, row_key

    rows = [{"method": "dense", "pattern": "dense", "sparsity": 0.0, "measured_sparsity": 0.0, "calib_samples": 8,
             "perplexity": 20.0, "prune_time_s": 0.0},
            {"method": "sparsegpt", "pattern": "2:4", "sparsity": 0.5, "measured_sparsity": 0.5, "calib_samples": 8,
             "perplexity": 30.0, "prune_time_s": 12.3}]
    table = markdown_table(rows).splitlines()
    assert table[2] == "| dense | dense | 0% | 0.0% | – | 20.00 | 1.00 | 0 |"
    assert table[3] == "| sparsegpt | 2:4 | 50% | 50.0% | 8 | 30.00 | 1.50 | 12 |"
    assert row_key("dense", "0", 8, 8) == row_key("dense", "0", 32, 8) == "dense|w8"  # no calibration
    assert row_key("sparsegpt", "0.5", 8, 8) == "sparsegpt|0.5|uniform|n8|w8"
    assert row_key("owl", "0.7", 8, None) == "owl|0.7|owl|n8|wNone"
    path = tmp_path / "results.json"
    path.write_text(json.dumps([{**rows[1], "setting": "2:4", "eval_windows": 8}]))  # the first (list) format
    assert list(load_rows(path)) == ["sparsegpt|2:4|uniform|n8|w8"]
