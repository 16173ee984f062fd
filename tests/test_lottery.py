"""Lottery tickets (`run_lottery`, ``prune-trainer lottery``): rewinding, nested masks, the compounded rate,
resume inside a round, bad input, and the two controls, on a tiny random BERT and synthetic CoNLL data."""

import json

import pytest
import torch
import yaml
from helpers import tiny_bert, tiny_tokenizer, write_conll_dir
from safetensors.torch import load_file

from prune_trainer.callbacks.fixed_mask import FixedMaskCallback, model_weights
from prune_trainer.cli import main
from prune_trainer.config import PruningConfig
from prune_trainer.methods.lottery import compounded_sparsity, imp_masks, random_masks_like
from prune_trainer.recipes.lottery import LotteryConfig, run_lottery
from prune_trainer.recipes.runner import load_recipe

RATE, ROUNDS, REWIND_STEP = 0.5, 2, 2


def _setup(root):
    model_dir = root / "tiny-model"
    tiny_bert().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    conll = write_conll_dir(root / "conll")
    recipe = {
        "name": "tiny_lottery", "model": str(model_dir), "data": {"max_length": 32, "data_dir": str(conll)},
        "training": {"max_steps": 6, "per_device_train_batch_size": 8, "learning_rate": 5e-3, "logging_steps": 2,
                     "eval_strategy": "no", "save_steps": 3, "save_total_limit": None, "use_cpu": True,
                     "disable_tqdm": True},
    }
    path = root / "tiny_lottery.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


class _Spy:
    """Records the model's weights and masks when each round starts training, and at step K of round 0."""

    def __init__(self, monkeypatch):
        self.at_start, self.at_k = {}, {}
        begin, step_end = FixedMaskCallback.on_train_begin, FixedMaskCallback.on_step_end
        spy = self

        def on_train_begin(self, args, state, control, **kw):
            begin(self, args, state, control, **kw)
            if state.global_step == 0:
                masks = {n: layer.weight_mask.clone() for n, layer in self.layers.items()}
                spy.at_start[args.output_dir] = (model_weights(self.model), masks)

        def on_step_end(self, args, state, control, **kw):
            step_end(self, args, state, control, **kw)
            if state.global_step == REWIND_STEP:
                spy.at_k[args.output_dir] = model_weights(self.model)

        monkeypatch.setattr(FixedMaskCallback, "on_train_begin", on_train_begin)
        monkeypatch.setattr(FixedMaskCallback, "on_step_end", on_step_end)


@pytest.fixture(scope="module")
def lottery(tmp_path_factory):
    """One lottery (2 rounds of p = 0.5, rewind to step 2) through the CLI, then both controls from Python."""
    root = tmp_path_factory.mktemp("lottery")
    recipe_path = _setup(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        spy = _Spy(mp)
        argv = ["lottery", str(recipe_path), "--rounds", str(ROUNDS), "--rate", str(RATE),
                "--rewind", f"step:{REWIND_STEP}", "--results-dir", str(root / "results")]
        assert main(argv) == 0
        recipe = load_recipe(recipe_path)
        controls = {kind: run_lottery(recipe, results_root=root / "results", rounds=ROUNDS, rate=RATE,
                                      rewind=f"step:{REWIND_STEP}", control=kind, seed=3)
                    for kind in ("random-reinit", "random-mask")}
    return {"root": root, "out": root / "results" / "tiny_lottery", "spy": spy, "recipe": recipe_path,
            "controls": controls}


def _masks(path):
    return {n: m.bool() for n, m in load_file(str(path)).items()}


def test_rewind_point_is_the_weights_after_step_k_of_round_0(lottery):
    rewind = load_file(str(lottery["out"] / "rewind.safetensors"))
    at_k = lottery["spy"].at_k[str(lottery["out"] / "round_0" / "checkpoints")]
    assert rewind.keys() == at_k.keys()
    assert all(torch.equal(rewind[k], at_k[k]) for k in rewind)


def test_each_round_starts_from_exactly_the_rewind_weights_on_every_unpruned_entry(lottery):
    out, rewind = lottery["out"], load_file(str(lottery["out"] / "rewind.safetensors"))
    for r in range(1, ROUNDS + 1):
        weights, masks = lottery["spy"].at_start[str(out / f"round_{r}" / "checkpoints")]
        assert masks.keys() == _masks(out / "masks" / f"round_{r}.safetensors").keys()
        for key, value in rewind.items():
            layer = key.removesuffix(".weight")
            if layer in masks:
                kept = masks[layer]
                assert torch.equal(weights[key][kept], value[kept])  # exact, every unpruned entry
                assert not weights[key][~kept].any()
            else:
                assert torch.equal(weights[key], value)  # head, embeddings, biases, LayerNorms: rewound too
        trained = load_file(str(out / f"round_{r}" / "model" / "model.safetensors"))
        assert all(not trained[f"{n}.weight"][~m].any() for n, m in masks.items())  # the mask held in training


def test_masks_nest_and_the_rate_compounds(lottery):
    out = lottery["out"]
    summary = json.loads((out / "summary.json").read_text())
    assert [row["round"] for row in summary["rounds"]] == [0, 1, 2]
    previous = None
    for r in range(1, ROUNDS + 1):
        masks = _masks(out / "masks" / f"round_{r}.safetensors")
        total = sum(m.numel() for m in masks.values())
        kept = sum(int(m.sum()) for m in masks.values())
        assert total - kept == round((1 - (1 - RATE) ** r) * total)
        if previous is not None:
            assert all(not (masks[n] & ~previous[n]).any() for n in masks)
        previous = masks
        row = summary["rounds"][r]
        assert row["target_sparsity"] == pytest.approx(1 - (1 - RATE) ** r)
        assert row["sparsity"] == pytest.approx(1 - (1 - RATE) ** r, abs=2 / total)  # measured on the export
    assert summary["rounds"][0]["sparsity"] == 0.0 and summary["budget"]["train_steps_per_round"] == 6


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_imp_masks_prune_the_rate_of_the_remaining_weights_by_magnitude(scope):
    gen = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(30, 20, generator=gen), "b": 3 * torch.randn(10, 50, generator=gen)}
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    for r in range(1, 4):
        new = imp_masks(weights, masks, compounded_sparsity(0.2, r), scope)
        assert all(not (new[n] & ~masks[n]).any() for n in new)  # nested
        if scope == "layer":
            assert all(int((~new[n]).sum()) == round(compounded_sparsity(0.2, r) * w.numel())
                       for n, w in weights.items())
        dropped = torch.cat([weights[n][masks[n] & ~new[n]].abs() for n in new])
        survived = torch.cat([weights[n][new[n]].abs() for n in new])
        if scope == "global":
            assert dropped.max() <= survived.min()  # the smallest magnitudes go
        masks = new
    with pytest.raises(ValueError, match="would revive pruned weights"):
        imp_masks(weights, masks, 0.1, scope)


def test_controls_keep_the_per_layer_sparsity_and_change_what_they_should(lottery):
    out = lottery["out"]
    for kind, summary in lottery["controls"].items():
        assert [row["round"] for row in summary["rounds"]] == [1, 2] and summary["control"] == kind
        for r in (1, 2):
            ours = json.loads((out / f"round_{r}" / "metrics.json").read_text())["sparsity_per_layer"]
            theirs = json.loads((out / f"control_{kind}" / f"round_{r}" / "metrics.json").read_text())
            assert theirs["sparsity_per_layer"].keys() == ours.keys()
            for name in ours:  # the same per-layer sparsity, measured on both exports
                assert theirs["sparsity_per_layer"][name] == pytest.approx(ours[name], abs=1e-3)
    lottery_masks = _masks(out / "masks" / "round_2.safetensors")
    random_masks = _masks(out / "control_random-mask" / "masks" / "round_2.safetensors")
    assert all(int(random_masks[n].sum()) == int(m.sum()) for n, m in lottery_masks.items())
    assert any(not torch.equal(random_masks[n], m) for n, m in lottery_masks.items())
    rewind = load_file(str(out / "rewind.safetensors"))
    reinit = load_file(str(out / "control_random-reinit" / "weights.safetensors"))
    for key in rewind:
        layer, kind = key.rsplit(".", 1)
        changed = layer in lottery_masks  # the masked Linears' weights and biases are redrawn, nothing else
        assert torch.equal(reinit[key], rewind[key]) != changed
        if changed and kind == "weight":
            assert reinit[key].std().item() == pytest.approx(0.02, rel=0.2)  # BERT's initializer_range
        elif changed:
            assert not reinit[key].any()


def test_resume_inside_a_round_equals_the_uninterrupted_round(lottery, tmp_path, monkeypatch):
    recipe = load_recipe(lottery["recipe"])
    kwargs = dict(results_root=tmp_path / "results", rounds=ROUNDS, rate=RATE, rewind=f"step:{REWIND_STEP}")
    step_end = FixedMaskCallback.on_step_end

    def crash(self, args, state, control, **kw):
        step_end(self, args, state, control, **kw)
        if state.global_step == 4 and "round_1" in args.output_dir:
            raise RuntimeError("killed")

    monkeypatch.setattr(FixedMaskCallback, "on_step_end", crash)
    with pytest.raises(RuntimeError, match="killed"):
        run_lottery(recipe, **kwargs)
    out = tmp_path / "results" / "tiny_lottery"
    assert (out / "round_1" / "checkpoints" / "checkpoint-3").is_dir() and not (out / "round_1" / "model").exists()
    monkeypatch.setattr(FixedMaskCallback, "on_step_end", step_end)
    summary = run_lottery(recipe, **kwargs)
    assert json.loads((out / "round_1" / "metrics.json").read_text())["resumed_from_step"] == 3
    for r in (1, 2):
        masks, ref_masks = (_masks(d / "masks" / f"round_{r}.safetensors") for d in (out, lottery["out"]))
        assert all(torch.equal(masks[n], ref_masks[n]) for n in ref_masks)
        ours = load_file(str(out / f"round_{r}" / "model" / "model.safetensors"))
        ref = load_file(str(lottery["out"] / f"round_{r}" / "model" / "model.safetensors"))
        assert all(torch.allclose(ours[k], ref[k], atol=1e-6) for k in ref)
    reference = json.loads((lottery["out"] / "summary.json").read_text())
    assert [row["eval_f1"] for row in summary["rounds"]] == pytest.approx([row["eval_f1"] for row in
                                                                           reference["rounds"]])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rate", "0"], "rate must be in (0, 1)"),
        (["--rate", "1"], "rate must be in (0, 1)"),
        (["--rate", "1.5"], "rate must be in (0, 1)"),
        (["--rounds", "0"], "rounds must be at least 1"),
        (["--rewind", "step:7"], "rewind step 7 is past the end of the first round (6 optimizer steps)"),
        (["--rewind", "epoch:1"], "rewind must be 'pretrained' or 'step:K'"),
        (["--control", "shuffle"], "control must be 'none' | 'random-reinit' | 'random-mask'"),
        (["--control", "random-mask"], "needs the lottery run in"),
        (["--scope", "row"], "scope must be 'global' | 'layer'"),
    ],
)
def test_bad_input_is_a_clear_error_before_anything_is_written(lottery, tmp_path, capsys, args, message):
    argv = ["lottery", str(lottery["recipe"]), "--results-dir", str(tmp_path / "results"), *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_a_control_refuses_a_lottery_with_other_settings_and_rounds_it_has_not_run(lottery, capsys):
    base = ["lottery", str(lottery["recipe"]), "--results-dir", str(lottery["root"] / "results"),
            "--control", "random-mask", "--rewind", f"step:{REWIND_STEP}"]
    assert main(base + ["--rate", "0.3", "--rounds", "2"]) == 2
    assert "holds a lottery with other settings (changed: rate)" in capsys.readouterr().err
    assert main(base + ["--rate", str(RATE), "--rounds", "3"]) == 2
    assert "run the lottery to round 3 first" in capsys.readouterr().err


def test_fixed_mask_callback_rejects_masks_of_other_layers(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "masks.safetensors"
    save_file({"bert.encoder.layer.0.output.dense": torch.ones(3, 3, dtype=torch.bool)}, str(path))
    config = PruningConfig(method="fixed_mask", options={"masks": str(path)})
    with pytest.raises(ValueError, match="do not match the target layers"):
        FixedMaskCallback(tiny_bert(), config)
    with pytest.raises(FileNotFoundError, match="weights file .* does not exist"):
        FixedMaskCallback(tiny_bert(), PruningConfig(method="fixed_mask", options={"weights": str(tmp_path / "x")}))


def test_random_masks_keep_each_layers_count():
    masks = {"a": torch.rand(8, 8) > 0.7, "b": torch.zeros(4, 6, dtype=torch.bool)}
    rand = random_masks_like(masks, seed=1)
    assert {n: int(m.sum()) for n, m in rand.items()} == {n: int(m.sum()) for n, m in masks.items()}
    assert LotteryConfig(rewind="step:12").rewind_step == 12


def test_lottery_report_tables_the_rounds_controls_and_seeds(tmp_path):
    from study.lottery_report import write_lottery_report

    def summary(rounds, f1s):
        return {"budget": {"train_steps_per_round": 6, "max_train_samples": 64,
                           "training": {"num_train_epochs": 1, "per_device_train_batch_size": 8}},
                "rate": 0.5, "rewind": "pretrained", "scope": "global",
                "rounds": [{"round": r, "sparsity": 1 - 0.5 ** r, "eval_f1": f} for r, f in zip(rounds, f1s)]}

    def metrics(folder, f1, sparsity=0.0):
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"eval_f1": f1, "sparsity": sparsity, "git_commit": "x",
                                                         "train_steps": 6}))

    (tmp_path / "imp" / "control_random-mask").mkdir(parents=True)
    (tmp_path / "imp" / "summary.json").write_text(json.dumps(summary([0, 1, 2], [0.80, 0.79, 0.70])))
    (tmp_path / "imp" / "control_random-mask" / "summary.json").write_text(json.dumps(summary([1, 2], [0.6, 0.5])))
    metrics(tmp_path / "dense_seed43", 0.78)
    metrics(tmp_path / "dense_seed44", 0.82)  # dense: 0.80 ± 0.02
    metrics(tmp_path / "imp_round_1_seed43", 0.77)
    metrics(tmp_path / "imp_round_1_seed44", 0.75)  # ticket round 1: 0.77 ± 0.02, below 0.78
    metrics(tmp_path / "gmp_0.75", 0.72, sparsity=0.75)
    readme = write_lottery_report(tmp_path).read_text()
    assert "Dense: 0.8000 ± 0.0200 (3 seeds)" in readme
    assert "| 1 | 0.5000 | 0.7900 | 0.7700 ± 0.0200 (n=3) | – | 0.6000 | – | no |" in readme
    assert "| 2 | 0.7500 | 0.7000 | – | – | 0.5000 | 0.7200 | no (1 seed) |" in readme
    assert (tmp_path / "f1_vs_sparsity.png").stat().st_size > 1000
