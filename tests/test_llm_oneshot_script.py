"""scripts/llm_oneshot.py, now a driver over the library's one-shot job: its rows prune a tiny Llama to the same
weights as the script's former private Llama loop (kept below as the reference) and report the perplexity of
`prune_trainer.llm.perplexity.perplexity`; rows resume, keys and the table keep their format."""

import json

import pytest
import torch
from torch import nn

from prune_trainer.data.text import load_text, tokenize_text, window_batches
from prune_trainer.llm.perplexity import perplexity
from prune_trainer.oneshot.base import LayerStats
from prune_trainer.oneshot.owl import outlier_ratio, owl_sparsities
from prune_trainer.oneshot.registry import get_method
from prune_trainer.oneshot.runner import run_oneshot
from prune_trainer.oneshot.wanda import wanda_scores
from scripts.llm_oneshot import (
    load_rows,
    main,
    markdown_table,
    parse_args,
    parse_setting,
    row_config,
    row_key,
)
from tests.test_llm_text import tiny_llama

# --- the reference: the script's former Llama-only sequential loop (blocks replayed with the keyword arguments
# --- recorded in one full forward with use_cache=False), as it was before the script moved onto the library.


class _Stop(Exception):
    pass


@torch.no_grad()
def ref_capture(model, batches):
    layers, hiddens, kwargs = model.model.layers, [], [{} for _ in model.model.layers]
    stop = {"first": False}

    def make_hook(i):
        def hook(module, args, kw):
            if i == 0:
                hiddens.append(args[0] if args else kw["hidden_states"])
            kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}
            if i == 0 and stop["first"]:
                raise _Stop
        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    for j, batch in enumerate(batches):
        stop["first"] = j > 0
        try:
            model(input_ids=batch, use_cache=False)
        except _Stop:
            pass
    for h in handles:
        h.remove()
    return hiddens, kwargs


def ref_run(block, hidden, kwargs):
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def ref_block_stats(block, hiddens, kwargs, full):
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    stats = {n: LayerStats.empty(m.in_features, full, m.weight.device) for n, m in linears.items()}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: stats[n].add(a[0])) for n, m in linears.items()]
    outs = [ref_run(block, h, kwargs) for h in hiddens]
    for h in handles:
        h.remove()
    return stats, outs


@torch.no_grad()
def ref_prune(model, calib, method, sparsity, prunen=0, prunem=0, batch_size=2):
    pruner = get_method(method)
    hiddens, kwargs = ref_capture(model, list(calib.split(batch_size)))
    for i, block in enumerate(model.model.layers):
        s = sparsity[i] if isinstance(sparsity, dict) else sparsity
        stats, _ = ref_block_stats(block, hiddens, kwargs[i], pruner.needs_hessian)
        for name, lin in block.named_modules():
            if isinstance(lin, nn.Linear):
                new_weight, keep = pruner.prune(lin.weight.data, stats[name], s, prunen, prunem)
                lin.weight.data.copy_(new_weight * keep)
        hiddens = [ref_run(block, h, kwargs[i]) for h in hiddens]


@torch.no_grad()
def ref_owl(model, calib, sparsity, m, lam, batch_size=2):
    hiddens, kwargs = ref_capture(model, list(calib.split(batch_size)))
    ratios, sizes = {}, {}
    for i, block in enumerate(model.model.layers):
        stats, hiddens = ref_block_stats(block, hiddens, kwargs[i], full=False)
        scores = [wanda_scores(block.get_submodule(n).weight.data, st.col_norm()).flatten() for n, st in stats.items()]
        ratios[i], sizes[i] = outlier_ratio(torch.cat(scores), m), sum(s.numel() for s in scores)
    return owl_sparsities(ratios, sizes, sparsity, lam)


# --- the tests


@pytest.fixture
def llama_dir(tmp_path):
    from helpers import tiny_tokenizer

    path = tmp_path / "llama"
    tiny_llama(4).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def script_args(llama_dir, conll_dir, out, *extra):
    return ["--model", str(llama_dir), "--out", str(out), "--calib", "4", "--seqlen", "16", "--batch-size", "2",
            "--eval-windows", "3", "--data-dir", str(conll_dir), "--device", "cpu", *extra]


@pytest.mark.parametrize("method, setting", [("sparsegpt", "2:4"), ("wanda", "0.5"), ("owl", "0.6")])
def test_rows_prune_as_the_former_loop_and_score_its_perplexity(llama_dir, conll_dir, tmp_path, method, setting):
    from helpers import tiny_tokenizer
    from transformers import LlamaForCausalLM

    args = parse_args(script_args(llama_dir, conll_dir, tmp_path / "grid"))
    cfg = row_config(method, setting, args)
    cfg.export, cfg.output_dir = True, str(tmp_path / "row")  # the grid does not export; here for the weights
    res = run_oneshot(cfg, progress=False)
    pruned = LlamaForCausalLM.from_pretrained(tmp_path / "row" / "model").eval()

    tok, ref = tiny_tokenizer(), tiny_llama(4)
    ids = tokenize_text(load_text("conll-train", conll_dir), tok)
    calib = torch.cat([b["input_ids"] for b in window_batches(ids, 4, 2, 16, 0)])
    sparsity, _, n, m = parse_setting(setting)
    if method == "owl":
        sparsity = ref_owl(ref, calib, sparsity, 5.0, 0.08)
        block = {int(k.split(".")[2]): v for k, v in res["owl"]["layer_sparsity"].items()}
        assert block == pytest.approx(sparsity, abs=1e-9)
    ref_prune(ref, calib, "wanda" if method == "owl" else method, sparsity, n, m)
    for (name, p), (_, q) in zip(ref.named_parameters(), pruned.named_parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    val = tokenize_text(load_text("conll-validation", conll_dir), tok)
    expected = perplexity(ref, val, 16, max_windows=3)
    assert res["eval_perplexity"] == pytest.approx(expected.perplexity, rel=1e-5)
    assert (res["eval_tokens"], res["eval_windows"]) == (expected.n_tokens, 3)


def test_grid_writes_resumable_rows(llama_dir, conll_dir, tmp_path, capsys):
    out = tmp_path / "grid"
    main(script_args(llama_dir, conll_dir, out, "--methods", "sparsegpt,magnitude,owl", "--settings", "0.5,2:4"))
    rows = load_rows(out / "results.json")
    assert list(rows) == ["dense|w3", "sparsegpt|0.5|uniform|n4|w3", "magnitude|0.5|uniform|n4|w3",
                          "owl|0.5|owl|n4|w3", "sparsegpt|2:4|uniform|n4|w3", "magnitude|2:4|uniform|n4|w3"]
    dense, owl = rows["dense|w3"], rows["owl|0.5|owl|n4|w3"]
    for key in ("model", "method", "sparsity", "pattern", "perplexity", "prune_time_s", "measured_sparsity",
                "calib_samples", "max_eval_windows", "eval_windows", "eval_tokens", "seqlen", "git_commit", "device",
                "command"):
        assert key in dense and key in owl, key
    assert (dense["method"], dense["pattern"], dense["sparsity"], dense["measured_sparsity"]) == ("dense", "dense",
                                                                                                    0.0, 0.0)
    assert owl["owl"]["m"] == 5.0 and set(owl["owl"]["block_sparsity"]) == {"0", "1"}  # JSON keys
    assert rows["sparsegpt|2:4|uniform|n4|w3"]["measured_sparsity"] == pytest.approx(0.5)
    ref = perplexity(tiny_llama(4), tokenize_text(load_text("conll-validation", conll_dir),
                                                  __import__("helpers").tiny_tokenizer()), 16, max_windows=3)
    assert dense["perplexity"] == pytest.approx(ref.perplexity, rel=1e-4)
    before = (out / "results.json").read_text()
    main(script_args(llama_dir, conll_dir, out, "--methods", "sparsegpt", "--settings", "0.5"))
    assert (out / "results.json").read_text() == before and "skip sparsegpt 0.5" in capsys.readouterr().out
    with pytest.raises(ValueError, match="calib_samples"):  # every row checked before the first one runs
        main(script_args(llama_dir, conll_dir, tmp_path / "bad", "--calib", "0"))
    assert not (tmp_path / "bad").exists()


def test_llm_surgeon_rows_carry_their_options(llama_dir, conll_dir, tmp_path):
    out = tmp_path / "grid"
    opts = '{"shots": 2, "cg_iters": 5}'
    main(script_args(llama_dir, conll_dir, out, "--methods", "llm-surgeon", "--settings", "0.5,2:4", "--options", opts))
    rows = load_rows(out / "results.json")
    assert list(rows) == ["dense|w3", "llm-surgeon|0.5|uniform|n4|w3|cg_iters=5,shots=2",
                          "llm-surgeon|2:4|uniform|n4|w3|cg_iters=5,shots=2"]
    for key in list(rows)[1:]:
        assert rows[key]["options"] == {"shots": 2, "cg_iters": 5}
        assert rows[key]["measured_sparsity"] == pytest.approx(0.5, abs=0.01)
        assert rows[key]["perplexity"] != rows["dense|w3"]["perplexity"]
    assert "| llm-surgeon cg_iters=5 shots=2 | 2:4 | 50% |" in markdown_table(list(rows.values()))
    with pytest.raises(ValueError, match="shots"):  # the options are checked before any row runs
        main(script_args(llama_dir, conll_dir, tmp_path / "bad", "--methods", "llm-surgeon", "--options",
                         '{"shots": 0}'))
    assert not (tmp_path / "bad").exists()


def test_markdown_table_and_row_keys(tmp_path):
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
    key = row_key("llm-surgeon", "0.5", 8, 8, {"allocation": "global"})
    assert key == "llm-surgeon|0.5|global|n8|w8|allocation=global"
    assert parse_setting("2:4") == (0.5, "2:4", 2, 4) and parse_setting("0.7") == (0.7, "unstructured", 0, 0)
    path = tmp_path / "results.json"
    path.write_text(json.dumps([{**rows[1], "setting": "2:4", "eval_windows": 8}]))  # the first (list) format
    assert list(load_rows(path)) == ["sparsegpt|2:4|uniform|n8|w8"]
    with pytest.raises(ValueError, match="N:M"):
        row_config("owl", "2:4", parse_args(["--out", str(tmp_path)]))
