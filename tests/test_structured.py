"""Structured pruning: coupled groups, scores, selection, the callback in a Trainer, physical export and reload."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_trainer, tiny_bert
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, TrainerCallback

from prune_trainer import PruningConfig, StructuredPruningCallback, export_structured_model, load_pruned_model
from prune_trainer.callbacks import make_pruning_callback
from prune_trainer.masking import masked_layers
from prune_trainer.methods.structured import magnitude_group_scores, select_groups, taylor_group_importance
from prune_trainer.structures import element_masks, find_structures, group_reduce

BERT_LAYER = "bert.encoder.layer.{}."


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                         num_hidden_layers=2, vocab_size=100)
    return LlamaForCausalLM(config).eval()


def tiny_deberta(share_att_key: bool = False, seed: int = 0):
    """DeBERTa-v2 with c2p and p2c relative attention (own or shared positional projections), 3 layers."""
    from transformers import DebertaV2Config, DebertaV2ForTokenClassification

    torch.manual_seed(seed)
    config = DebertaV2Config(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=3,
                             vocab_size=100, relative_attention=True, pos_att_type=["p2c", "c2p"],
                             share_att_key=share_att_key, max_relative_positions=16, position_buckets=8)
    return DebertaV2ForTokenClassification(config).eval()


def tiny_modernbert(attn_implementation: str = "eager", seed: int = 0):
    """ModernBERT with a sliding-window layer between two global ones (window smaller than the test inputs)."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    torch.manual_seed(seed)
    config = ModernBertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=3,
                              vocab_size=100, global_attn_every_n_layers=2, local_attention=4, pad_token_id=0,
                              eos_token_id=1, bos_token_id=2, cls_token_id=2, sep_token_id=1,
                              attention_bias=True, mlp_bias=True, attn_implementation=attn_implementation)
    return ModernBertForMaskedLM(config).eval()


def shapes(model, groups):
    return {lin.name: model.get_submodule(lin.name).weight.shape for lin in groups.linears}


def test_bert_head_and_neuron_masks_cover_exactly_the_coupled_weights():
    model = tiny_bert(num_attention_heads=4)  # hidden 32: head size 8
    st = find_structures(model)
    heads, ffn = st.groups["heads"], st.groups["ffn"]
    assert heads.sizes == [4, 4] and ffn.sizes == [64, 64] and st.head_dim == 8
    assert heads.weights_per_group == 4 * 8 * 32 and ffn.weights_per_group == 2 * 32
    keep = torch.ones(8, dtype=torch.bool)
    keep[4 + 1] = False  # head 1 of layer 1
    masks = element_masks(heads, keep, shapes(model, heads))
    p = BERT_LAYER.format(1)
    for name in ("attention.self.query", "attention.self.key", "attention.self.value"):
        expected = torch.ones(32, 32, dtype=torch.bool)
        expected[8:16, :] = False
        assert torch.equal(masks[p + name], expected), name
    expected = torch.ones(32, 32, dtype=torch.bool)
    expected[:, 8:16] = False
    assert torch.equal(masks[p + "attention.output.dense"], expected)
    assert all(bool(m.all()) for n, m in masks.items() if n.startswith(BERT_LAYER.format(0)))
    assert len(masks) == 8  # q, k, v, o of two layers, nothing else

    keep = torch.ones(128, dtype=torch.bool)
    keep[5] = False  # neuron 5 of layer 0
    masks = element_masks(ffn, keep, shapes(model, ffn))
    p = BERT_LAYER.format(0)
    assert torch.equal(masks[p + "intermediate.dense"].all(dim=1), torch.arange(64) != 5)
    assert bool(masks[p + "intermediate.dense"][torch.arange(64) != 5].all())
    assert torch.equal(masks[p + "output.dense"].all(dim=0), torch.arange(64) != 5)
    assert int((~masks[p + "output.dense"]).sum()) == 32 and int((~masks[p + "intermediate.dense"]).sum()) == 32
    assert all(bool(m.all()) for n, m in masks.items() if n.startswith(BERT_LAYER.format(1)))


def test_llama_kv_group_removes_its_kv_rows_and_its_query_heads():
    model = tiny_llama()
    st = find_structures(model)
    heads = st.groups["heads"]
    assert st.queries_per_group == 2 and st.head_dim == 8 and heads.sizes == [2, 2]
    assert heads.weights_per_group == (2 * 2 + 2) * 8 * 32
    keep = torch.tensor([True, False, True, True])  # KV group 1 of layer 0
    masks = element_masks(heads, keep, shapes(model, heads))
    p = "model.layers.0.self_attn."
    rows_kv = torch.arange(16) >= 8
    rows_q = torch.arange(32) >= 16  # query heads 2 and 3 read KV head 1
    assert torch.equal(~masks[p + "k_proj"].all(dim=1), rows_kv)
    assert torch.equal(~masks[p + "v_proj"].all(dim=1), rows_kv)
    assert torch.equal(~masks[p + "q_proj"].all(dim=1), rows_q)
    assert torch.equal(~masks[p + "o_proj"].all(dim=0), rows_q)
    assert int(sum((~m).sum() for m in masks.values())) == heads.weights_per_group
    ffn = st.groups["ffn"]
    assert ffn.weights_per_group == 3 * 32
    masks = element_masks(ffn, torch.arange(128) != 70, shapes(model, ffn))  # neuron 6 of layer 1
    p = "model.layers.1.mlp."
    assert torch.equal(~masks[p + "gate_proj"].all(dim=1), torch.arange(64) == 6)
    assert torch.equal(~masks[p + "up_proj"].all(dim=1), torch.arange(64) == 6)
    assert torch.equal(~masks[p + "down_proj"].all(dim=0), torch.arange(64) == 6)


def test_llama_removed_kv_group_is_the_same_function_as_zeroing_its_query_heads_output():
    model = tiny_llama()
    x = torch.randint(0, 100, (2, 10))
    pruner = StructuredPruningCallback(model, structures=["heads"])
    heads = pruner.structures.groups["heads"]
    masks = element_masks(heads, torch.tensor([True, False, True, True]), shapes(model, heads))
    with torch.no_grad():
        # reference: only the o columns of query heads 2, 3 zeroed (the coupled q/k/v rows then do not matter)
        o = model.model.layers[0].self_attn.o_proj
        saved = o.weight.clone()
        o.weight[:, 16:] = 0
        ref = model(input_ids=x).logits
        o.weight.copy_(saved)
        for name, mask in masks.items():
            pruner.layers[name].set_mask(mask)
        assert torch.allclose(model(input_ids=x).logits, ref, atol=1e-6)


def test_group_scores_match_hand_computed_values():
    model = tiny_bert(num_attention_heads=4)
    heads = find_structures(model).groups["heads"]
    p = model.bert.encoder.layer[1].attention
    weights = {lin.name: model.get_submodule(lin.name).weight for lin in heads.linears}
    scores = magnitude_group_scores(heads, weights)
    h = slice(16, 24)  # head 2
    expected = (p.self.query.weight[h].pow(2).sum() + p.self.key.weight[h].pow(2).sum()
                + p.self.value.weight[h].pow(2).sum() + p.output.dense.weight[:, h].pow(2).sum()).sqrt()
    assert torch.allclose(scores[4 + 2], expected)
    out = model(input_ids=torch.randint(5, 30, (2, 8))).logits
    out.square().mean().backward()
    grads = {n: w.grad for n, w in weights.items()}
    taylor = taylor_group_importance(heads, weights, grads)
    ws = [p.self.query.weight, p.self.key.weight, p.self.value.weight]
    expected = sum((w.grad[h] * w[h]).abs().sum() for w in ws) + (p.output.dense.weight.grad[:, h]
                                                                  * p.output.dense.weight[:, h]).abs().sum()
    assert torch.allclose(taylor[4 + 2], expected.detach())
    assert torch.allclose(group_reduce(heads, {n: torch.ones_like(w) for n, w in weights.items()}),
                          torch.full((8,), float(heads.weights_per_group)))


def test_selection_global_layer_rounding_and_floor():
    ffn = find_structures(tiny_bert(), ["ffn"]).groups["ffn"]  # two layers of 64 neurons
    scores = torch.cat([torch.arange(64.0) + 100, torch.arange(64.0)])  # layer 0 all better than layer 1
    keep = select_groups(ffn, scores, 0.5, "global", round_to=8, floor=8)
    assert int(keep[:64].sum()) == 56 and int(keep[64:].sum()) == 8  # layer 1 keeps its floor only
    assert bool(keep[64 + 56:].all()) and not bool(keep[64:64 + 56].any())  # its 8 best neurons
    keep = select_groups(ffn, scores, 0.3, "layer", round_to=8, floor=8)
    # each layer: 64 - round(0.3·64) = 45 kept, rounded up to 48; its best 48 neurons
    assert int(keep[:64].sum()) == 48 and int(keep[64:].sum()) == 48 and bool(keep[16:64].all())
    keep = select_groups(ffn, scores, 0.3, "global", round_to=1, floor=1)
    assert int(keep.sum()) == 128 - 38
    removed = torch.zeros(128, dtype=torch.bool)
    removed[:4] = True  # already removed: they stay removed even though their scores are high
    keep = select_groups(ffn, scores, 0.1, "layer", round_to=1, floor=1, removed=removed)
    assert not bool(keep[:4].any())
    heads = find_structures(tiny_bert(num_attention_heads=4), ["heads"]).groups["heads"]
    keep = select_groups(heads, torch.arange(8.0), 0.99, "global", round_to=1, floor=1)
    assert keep.view(2, 4).sum(dim=1).tolist() == [1, 1]  # never every head of a layer


def masked_vs_sliced(model, x, pruner, tmp_path):
    with torch.no_grad():
        masked = model(input_ids=x).logits
    sizes = export_structured_model(model, tmp_path / "sliced")
    reloaded = load_pruned_model(tmp_path / "sliced")
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, masked, atol=1e-5)  # sliced in place
        assert torch.allclose(reloaded(input_ids=x).logits, masked, atol=1e-5)
    return sizes, reloaded


def test_bert_masked_equals_sliced_with_different_heads_per_layer(tmp_path):
    model = tiny_bert(num_attention_heads=4).eval()
    dense = sum(p.numel() for p in model.parameters())
    pruner = StructuredPruningCallback(model, round_to_ffn=4)
    heads, ffn = pruner.structures.groups["heads"], pruner.structures.groups["ffn"]
    head_keep = torch.tensor([False, True, False, False, True, True, False, True])  # 1 head, then 3
    ffn_keep = torch.rand(128, generator=torch.Generator().manual_seed(0)) < 0.5
    for groups, keep in ((heads, head_keep), (ffn, ffn_keep)):
        for name, mask in element_masks(groups, keep, shapes(model, groups)).items():
            pruner.layers[name].set_mask(mask)
    x = torch.randint(5, 30, (3, 12))
    sizes, reloaded = masked_vs_sliced(model, x, pruner, tmp_path)
    assert sizes == {"heads": [1, 3], "ffn": ffn_keep.view(2, 64).sum(dim=1).tolist()}
    layer0 = reloaded.bert.encoder.layer[0]
    assert layer0.attention.self.query.weight.shape == (8, 32) and layer0.attention.self.num_attention_heads == 1
    assert layer0.attention.self.all_head_size == 8
    assert reloaded.bert.encoder.layer[1].attention.output.dense.weight.shape == (32, 24)
    assert sum(p.numel() for p in reloaded.parameters()) < dense
    config = json.loads((tmp_path / "sliced" / "config.json").read_text())
    assert config["prune_trainer_structure"] == {**sizes, "uniform": False} and config["num_attention_heads"] == 4
    assert not list((tmp_path / "sliced").glob("*.bin"))


def test_llama_masked_equals_sliced_through_the_callback(tmp_path):
    model = tiny_llama()
    pruner = StructuredPruningCallback(model, scope="layer")
    pruner.prune(0, target=0.5)
    x = torch.randint(0, 100, (2, 10))
    sizes, reloaded = masked_vs_sliced(model, x, pruner, tmp_path)
    assert sizes == {"heads": [2, 2], "ffn": [32, 32]}  # one KV group (two query heads) and half the neurons a layer
    attn = reloaded.model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (8, 32) and attn.q_proj.weight.shape == (16, 32)
    assert attn.o_proj.weight.shape == (32, 16) and reloaded.model.layers[1].mlp.down_proj.weight.shape == (32, 32)


def test_load_pruned_model_loads_a_plain_checkpoint_unsliced(tmp_path):
    model = tiny_bert().eval()
    model.save_pretrained(tmp_path / "plain")
    reloaded = load_pruned_model(tmp_path / "plain")
    assert type(reloaded) is type(model) and not reloaded.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("score", ["magnitude", "taylor", "fisher"])
def test_trainer_run_reaches_the_target_with_exact_zeros(tmp_path, score):
    model = tiny_bert(num_attention_heads=4)
    pruner = StructuredPruningCallback(model, final_sparsity=0.5, start_step=2, end_step=10, frequency=2,
                                       score=score, round_to_ffn=8)
    make_trainer(tmp_path, model, callbacks=[pruner], max_steps=16).train()
    keep = pruner.group_keep()
    assert int(keep["heads"].sum()) == 4 and int(keep["ffn"].sum()) == 64
    assert min(keep["heads"].view(2, 4).sum(dim=1).tolist()) >= 1
    assert all(n % 8 == 0 for n in keep["ffn"].view(2, 64).sum(dim=1).tolist())
    zeros = sum(int((layer.weight == 0).sum()) for layer in pruner.layers.values())
    total = sum(layer.weight.numel() for layer in pruner.layers.values())
    assert zeros / total == pytest.approx(0.5, abs=1e-3)  # exactly the removed groups' weights
    for name, bias_keep in pruner.bias_keep().items():
        bias = pruner.layers[name].bias
        assert bool((bias[~bias_keep] == 0).all()) and bool((bias[bias_keep] != 0).all())
    state = pruner.state_dict()
    assert state["method"] == "structured" and state["current_target"] == pytest.approx(0.5)
    json.dumps(state)  # checkpoint state is plain JSON
    export_structured_model(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["prune_trainer_structure"]["ffn"] == (
        keep["ffn"].view(2, 64).sum(dim=1).tolist()
    )


def test_taylor_scores_survive_the_checkpoint_state():
    model = tiny_bert(num_attention_heads=4)
    pruner = StructuredPruningCallback(model, score="taylor")
    pruner.taylor_scores["heads"].copy_(torch.arange(8.0) / 3)
    pruner.steps_seen = 5
    other = StructuredPruningCallback(tiny_bert(num_attention_heads=4), score="taylor")
    other.load_state_dict(json.loads(json.dumps(pruner.state_dict())))
    assert torch.equal(other.taylor_scores["heads"], pruner.taylor_scores["heads"]) and other.steps_seen == 5
    with pytest.raises(ValueError, match="no gradient"):
        StructuredPruningCallback(tiny_bert(), score="taylor").prune(0, target=0.3)


def test_registered_with_typed_options():
    model = tiny_bert()
    pruner = make_pruning_callback(model, PruningConfig(method="structured", options={"structures": ["ffn"]}))
    assert isinstance(pruner, StructuredPruningCallback) and list(pruner.structures.groups) == ["ffn"]
    assert len(pruner.layers) == 4  # intermediate and output dense of two layers
    with pytest.raises(ValueError, match="score must be"):
        PruningConfig(method="structured", options={"score": "hessian"})
    with pytest.raises(ValueError, match="ema applies to score 'taylor' only"):
        PruningConfig(method="structured", options={"score": "fisher", "ema": 0.9})
    with pytest.raises(ValueError, match="structures must be"):
        PruningConfig(method="structured", options={"structures": ["rows"]})


@pytest.mark.parametrize(
    ("make", "overrides", "message"),
    [
        (lambda: tiny_bert(num_attention_heads=4), {"min_heads": 0}, "removing every head"),
        (lambda: tiny_bert(num_attention_heads=4), {"min_heads": 5}, "floor of 5"),
        (lambda: tiny_bert(num_attention_heads=4), {"round_to_heads": 8}, "round_to 8 is larger than layer 0"),
        (lambda: tiny_bert(), {"round_to_ffn": 128}, "round_to 128 is larger than layer 0, which has 64"),
        (lambda: tiny_bert(), {"pattern": "2:4"}, "pattern must be unstructured"),
        (lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)), {},
         r"'gpt2'.*supported model_type values: \['bert', 'deberta-v2', 'distilbert', 'llama', 'mistral', "
         r"'modernbert', 'qwen2', 'roberta'\]"),
    ],
)
def test_bad_input_is_refused_before_the_model_is_touched(make, overrides, message):
    model = make()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        StructuredPruningCallback(model, **overrides)
    assert masked_layers(model) == {}
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


class StopAt(TrainerCallback):
    """Stops the run when it reaches ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_taylor_resume_equals_the_uninterrupted_run(tmp_path):
    common = dict(max_steps=12, save_strategy="steps", save_steps=5, learning_rate=1e-3)
    sched = dict(final_sparsity=0.5, start_step=2, end_step=10, frequency=4, score="taylor", round_to_ffn=4)
    full_model = tiny_bert(num_attention_heads=4)
    full = StructuredPruningCallback(full_model, **sched)
    make_trainer(tmp_path / "full", full_model, [full], **common).train()
    part_model = tiny_bert(num_attention_heads=4)
    make_trainer(tmp_path / "part", part_model, [StructuredPruningCallback(part_model, **sched), StopAt(7)],
                 **common).train()
    resumed_model = tiny_bert(seed=5, num_attention_heads=4)
    resumed = StructuredPruningCallback(resumed_model, **sched)
    make_trainer(tmp_path / "part", resumed_model, [resumed], **common).train(resume_from_checkpoint=True)
    assert full.pruning_steps == 3
    for name, layer in full.layers.items():
        assert torch.equal(layer.weight_mask, resumed.layers[name].weight_mask), name
        if layer.bias is not None:  # removed groups' biases are zero in both
            assert torch.equal(layer.bias == 0, resumed.layers[name].bias == 0), name


def other_families():
    from transformers import (
        DistilBertConfig,
        DistilBertForTokenClassification,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        RobertaConfig,
        RobertaForTokenClassification,
    )

    small = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, vocab_size=100)
    gqa = dict(small, num_key_value_heads=2)
    return [
        lambda: DistilBertForTokenClassification(DistilBertConfig(dim=32, n_heads=4, hidden_dim=64, n_layers=2,
                                                                  vocab_size=100)),
        lambda: RobertaForTokenClassification(RobertaConfig(**small)),
        lambda: Qwen2ForCausalLM(Qwen2Config(**gqa)),  # q/k/v with biases
        lambda: MistralForCausalLM(MistralConfig(**gqa)),
        lambda: tiny_deberta(share_att_key=False),
        lambda: tiny_deberta(share_att_key=True),
        lambda: tiny_modernbert("eager"),
        lambda: tiny_modernbert("sdpa"),
    ]


@pytest.mark.parametrize("make", other_families(), ids=["distilbert", "roberta", "qwen2", "mistral", "deberta-v2",
                                                        "deberta-v2-shared", "modernbert", "modernbert-sdpa"])
def test_every_family_of_the_table_slices_to_the_masked_function(make, tmp_path):
    torch.manual_seed(0)
    model = perturbed(make().eval())
    pruner = StructuredPruningCallback(model, round_to_ffn=4)
    pruner.prune(0, target=0.5)
    x = torch.randint(3, 100, (2, 10))
    sizes, reloaded = masked_vs_sliced(model, x, pruner, tmp_path)
    layers = len(sizes["heads"])
    assert sum(sizes["heads"]) == 2 * layers and sum(sizes["ffn"]) == 32 * layers
    assert type(reloaded) is type(model)


def perturbed(model):
    with torch.no_grad():
        for p in model.parameters():  # non-zero biases everywhere, so that a mis-sliced bias shows
            p.add_(0.05 * torch.randn_like(p))
    return model


def mask_groups(model, head_keep, ffn_keep):
    pruner = StructuredPruningCallback(model, round_to_ffn=4)
    for kind, keep in (("heads", head_keep), ("ffn", ffn_keep)):
        groups = pruner.structures.groups[kind]
        for name, mask in element_masks(groups, keep, shapes(model, groups)).items():
            pruner.layers[name].set_mask(mask)
    return pruner


HEADS_1_3_2 = torch.tensor([False, False, True, False, True, True, False, True, True, False, False, True])


@pytest.mark.parametrize("share_att_key", [False, True])
def test_deberta_v2_relative_attention_slices_heads_with_their_position_projections(share_att_key, tmp_path):
    model = perturbed(tiny_deberta(share_att_key))
    dense = {n: w.clone() for n, w in model.state_dict().items()}
    ffn_keep = torch.rand(192, generator=torch.Generator().manual_seed(0)) < 0.5
    pruner = mask_groups(model, HEADS_1_3_2, ffn_keep)
    heads = pruner.structures.groups["heads"]
    own = [] if share_att_key else ["pos_key_proj", "pos_query_proj"]
    p = "deberta.encoder.layer.0.attention.self."
    names = [p + n for n in ["query_proj", "key_proj", "value_proj", *own]]
    assert [lin.name for lin in heads.linears[:len(names)]] == names
    assert heads.weights_per_group == (4 + len(own)) * 8 * 32
    sizes, reloaded = masked_vs_sliced(model, torch.randint(3, 100, (2, 12)), pruner, tmp_path)
    assert sizes == {"heads": [1, 3, 2], "ffn": ffn_keep.view(3, 64).sum(dim=1).tolist()}
    attn = reloaded.deberta.encoder.layer[0].attention.self
    assert attn.num_attention_heads == 1 and attn.all_head_size == 8 and attn.query_proj.weight.shape == (8, 32)
    for name in own:  # head 2 of layer 0 kept: its rows 16..24 of each positional projection
        assert torch.equal(getattr(attn, name).weight, dense[p + name + ".weight"][16:24])
        assert torch.equal(getattr(attn, name).bias, dense[p + name + ".bias"][16:24])
    assert hasattr(attn, "pos_key_proj") != share_att_key
    assert reloaded.deberta.encoder.layer[1].attention.output.dense.weight.shape == (32, 24)


def test_modernbert_fused_qkv_and_glu_rows_belong_to_their_head_and_neuron():
    model = tiny_modernbert()
    st = find_structures(model)
    heads, ffn = st.groups["heads"], st.groups["ffn"]
    assert heads.sizes == [4, 4, 4] and ffn.sizes == [64, 64, 64] and st.head_dim == 8
    assert heads.weights_per_group == 4 * 8 * 32 and ffn.weights_per_group == 3 * 32
    keep = torch.ones(12, dtype=torch.bool)
    keep[4 + 2] = False  # head 2 of layer 1
    masks = element_masks(heads, keep, shapes(model, heads))
    rows = torch.zeros(96, dtype=torch.bool)
    for part in range(3):  # its q, k and v rows inside [q | k | v]
        rows[part * 32 + 16:part * 32 + 24] = True
    assert torch.equal(~masks["model.layers.1.attn.Wqkv"].all(dim=1), rows)
    assert torch.equal(~masks["model.layers.1.attn.Wo"].all(dim=0), torch.arange(32) // 8 == 2)
    assert int(sum((~m).sum() for m in masks.values())) == heads.weights_per_group
    masks = element_masks(ffn, torch.arange(192) != 64 + 5, shapes(model, ffn))  # neuron 5 of layer 1
    wi_rows = torch.zeros(128, dtype=torch.bool)
    wi_rows[[5, 64 + 5]] = True  # its input row and its gate row
    assert torch.equal(~masks["model.layers.1.mlp.Wi"].all(dim=1), wi_rows)
    assert torch.equal(~masks["model.layers.1.mlp.Wo"].all(dim=0), torch.arange(64) == 5)
    assert int(sum((~m).sum() for m in masks.values())) == ffn.weights_per_group


def test_an_architecture_names_separate_or_fused_projections():
    from prune_trainer.structures import Architecture

    common = dict(layers="layers", attention="attn", attention_out="attn.Wo", ffn_in=("mlp.Wi",), ffn_out="mlp.Wo",
                  head_size_attr="head_dim")
    with pytest.raises(ValueError, match="either fused_qkv or query/key/value"):
        Architecture(**common, fused_qkv="attn.Wqkv", query="attn.q")
    with pytest.raises(ValueError, match="either fused_qkv or query/key/value"):
        Architecture(**common, query="attn.q", key="attn.k")
    with pytest.raises(ValueError, match="fused_glu needs one FFN input Linear"):
        Architecture(**dict(common, ffn_in=("a", "b")), fused_qkv="attn.Wqkv", fused_glu=True)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_modernbert_masked_equals_sliced_with_different_heads_per_layer(attn_implementation, tmp_path):
    model = perturbed(tiny_modernbert(attn_implementation))
    dense_qkv = model.model.layers[0].attn.Wqkv.weight.detach().clone()
    ffn_keep = torch.rand(192, generator=torch.Generator().manual_seed(1)) < 0.4
    pruner = mask_groups(model, HEADS_1_3_2, ffn_keep)
    x = torch.randint(3, 100, (2, 12))  # longer than the sliding window of layer 1
    sizes, reloaded = masked_vs_sliced(model, x, pruner, tmp_path)
    kept = ffn_keep.view(3, 64).sum(dim=1).tolist()
    assert sizes == {"heads": [1, 3, 2], "ffn": kept}
    sliced = reloaded.model.layers[0]
    assert sliced.attn.Wqkv.weight.shape == (24, 32) and sliced.attn.Wo.weight.shape == (32, 8)
    qkv = dense_qkv.view(3, 4, 8, 32)[:, 2].reshape(24, 32)  # head 2's q, k, v rows in that order
    assert torch.equal(sliced.attn.Wqkv.weight, qkv)
    assert reloaded.model.layers[1].attn.Wqkv.weight.shape == (72, 32)
    assert reloaded.model.layers[2].mlp.Wi.weight.shape == (2 * kept[2], 32)
    assert reloaded.model.layers[2].mlp.Wo.weight.shape == (32, kept[2])
    # the in-place sliced model runs the chosen kernel; the reloaded one the default sdpa (same logits above)
    assert model.config._attn_implementation == attn_implementation and reloaded.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_selection_invariants_on_random_scores(scope):
    ffn = find_structures(tiny_bert(num_hidden_layers=3), ["ffn"]).groups["ffn"]  # 3 layers x 64
    gen = torch.Generator().manual_seed(1)
    for trial in range(20):
        scores = torch.randn(192, generator=gen) * torch.rand(3, generator=gen).repeat_interleave(64)
        target, round_to = float(torch.rand(1, generator=gen)) * 0.95, [1, 4, 8][trial % 3]
        keep = select_groups(ffn, scores, target, scope, round_to=round_to, floor=round_to)
        per_layer = keep.view(3, 64).sum(dim=1)
        assert bool((per_layer % round_to == 0).all()) and bool((per_layer >= round_to).all())
        for layer in range(3):  # each layer keeps its best groups
            s, k = scores.view(3, 64)[layer], keep.view(3, 64)[layer]
            if bool(k.any()) and not bool(k.all()):
                assert s[k].min() >= s[~k].max()
        if scope == "global":  # whole blocks until the budget is met (floors may exceed it)
            wanted = 192 - round(target * 192)
            assert wanted <= int(keep.sum()) < max(wanted, 3 * round_to) + round_to
        else:
            want = 64 - round(target * 64)
            assert bool((per_layer >= want).all()) and bool((per_layer < max(want, round_to) + round_to).all())


def test_a_bf16_export_reloads_as_bf16_with_the_same_logits(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    pruner = StructuredPruningCallback(model, round_to_ffn=4)
    pruner.prune(0, target=0.5)
    x = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        masked = model(input_ids=x).logits
    export_structured_model(model, tmp_path / "bf16")
    reloaded = load_pruned_model(tmp_path / "bf16")
    assert reloaded.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=x).logits.float(), masked.float(), atol=1e-2, rtol=1e-2)


def test_fisher_group_score_equals_brute_force_per_sample_gate_gradients():
    """Σ_n (∂L_n/∂m_g)² from the hooks == autograd of gates m_g multiplying each group's weights, sample by sample."""
    torch.manual_seed(0)
    model = tiny_bert(num_attention_heads=4)
    pruner = StructuredPruningCallback(model, score="fisher")
    model.train()
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    n, t = 3, 7
    ids = torch.randint(0, model.config.vocab_size, (n, t))
    labels = torch.randint(0, model.config.num_labels, (n, t))
    labels[1, 5:] = -100
    pruner._install_fisher_hooks()
    model(input_ids=ids, labels=labels).loss.backward()
    pruner._flush_gate_grads()
    assert pruner.fisher_samples == n
    # brute force: gates on the groups, the batch loss split into each sample's share, autograd per sample
    structures = pruner.structures
    params = {name: p.detach() for name, p in model.named_parameters()}
    gates = {kind: torch.ones(g.num_groups, requires_grad=True) for kind, g in structures.groups.items()}

    def gated_params():
        out = dict(params)
        for kind, groups in structures.groups.items():
            for lin in groups.linears:
                gate = gates[kind][lin.group_ids]
                key = f"{lin.name}.weight"
                out[key] = params[key] * (gate[:, None] if lin.axis == 0 else gate[None, :])
        return out

    for handle in pruner._fisher_hooks:
        handle.remove()
    logits = torch.func.functional_call(model, gated_params(), (), {"input_ids": ids}).logits
    token_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(n, t)
    total_tokens = (labels != -100).sum()
    expected = {kind: torch.zeros(g.num_groups) for kind, g in structures.groups.items()}
    for i in range(n):
        share = token_loss[i].sum() / total_tokens  # sample i's part of the mean loss the Trainer differentiates
        grads = torch.autograd.grad(share, list(gates.values()), retain_graph=True)
        for kind, grad in zip(gates, grads):
            expected[kind] += grad.pow(2)
    for kind in gates:
        torch.testing.assert_close(pruner.fisher_sums[kind], expected[kind], rtol=1e-4, atol=1e-10)
        assert bool((expected[kind] > 0).all())
    scores = pruner.group_scores()
    torch.testing.assert_close(scores["ffn"], 0.5 * expected["ffn"] / n, rtol=1e-4, atol=1e-12)


def test_fisher_state_survives_the_checkpoint_and_needs_a_gradient():
    pruner = StructuredPruningCallback(tiny_bert(num_attention_heads=4), score="fisher")
    pruner.fisher_sums["ffn"].copy_(torch.arange(128.0))
    pruner.fisher_samples = 9
    other = StructuredPruningCallback(tiny_bert(num_attention_heads=4), score="fisher")
    other.load_state_dict(json.loads(json.dumps(pruner.state_dict())))
    assert torch.equal(other.fisher_sums["ffn"], pruner.fisher_sums["ffn"]) and other.fisher_samples == 9
    with pytest.raises(ValueError, match="structured fisher pruning at step 0 .* has seen no gradient"):
        StructuredPruningCallback(tiny_bert(), score="fisher").prune(0, target=0.3)


def _zero_groups(model, keep_by_kind):
    """Zero every coupled weight of the groups not kept (what the masks do), through element_masks."""
    structures = find_structures(model)
    with torch.no_grad():
        for kind, keep in keep_by_kind.items():
            groups = structures.groups[kind]
            for name, mask in element_masks(groups, keep, shapes(model, groups)).items():
                model.get_submodule(name).weight.mul_(mask)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_uniform_llama_family_export_loads_with_plain_from_pretrained(family, tmp_path):
    import transformers
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "mistral": transformers.MistralConfig}[family]
    torch.manual_seed(0)
    config = config_cls(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                        num_hidden_layers=2, vocab_size=100)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ffn_keep = torch.ones(128, dtype=torch.bool)
    ffn_keep[torch.cat([torch.arange(0, 64, 3), torch.arange(64, 128, 3)[:22]])] = False  # 22 per layer
    _zero_groups(model, {"heads": torch.tensor([True, False, False, True]), "ffn": ffn_keep})
    x = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        masked = model(input_ids=x).logits
    export_structured_model(model, tmp_path / "u")
    saved = json.loads((tmp_path / "u" / "config.json").read_text())
    assert saved["prune_trainer_structure"]["uniform"] is True
    assert (saved["num_attention_heads"], saved["num_key_value_heads"], saved["head_dim"],
            saved["intermediate_size"]) == (2, 1, 8, 42)
    plain, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "u", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = load_pruned_model(tmp_path / "u")
    with torch.no_grad():
        assert torch.allclose(plain.eval()(input_ids=x).logits, masked, atol=1e-5)
        assert torch.allclose(ours(input_ids=x).logits, masked, atol=1e-5)
    assert ours.generate(x, max_new_tokens=3, do_sample=False).shape == (2, 10)


def test_non_uniform_llama_export_keeps_dense_config_and_generates(tmp_path):
    model = tiny_llama()
    _zero_groups(model, {"heads": torch.tensor([True, False, True, True])})
    export_structured_model(model, tmp_path / "n")
    saved = json.loads((tmp_path / "n" / "config.json").read_text())
    assert saved["prune_trainer_structure"]["uniform"] is False and saved["num_attention_heads"] == 4
    x = torch.randint(0, 100, (2, 5))
    assert load_pruned_model(tmp_path / "n").generate(x, max_new_tokens=3, do_sample=False).shape == (2, 8)


def test_bert_uniform_ffn_with_all_heads_rewrites_only_intermediate_size(tmp_path):
    model = tiny_bert(num_attention_heads=4).eval()
    groups = find_structures(model).groups["ffn"]
    keep = torch.ones(groups.num_groups, dtype=torch.bool)
    offsets = groups.layer_offsets()
    for off in offsets:
        keep[off:off + 5] = False
    _zero_groups(model, {"ffn": keep})
    x = torch.randint(0, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        masked = model(input_ids=x).logits
    export_structured_model(model, tmp_path / "b")
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["prune_trainer_structure"]["uniform"] is True
    assert saved["intermediate_size"] == groups.sizes[0] - 5
    plain = type(model).from_pretrained(tmp_path / "b").eval()
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=x).logits, masked, atol=1e-5)


def test_load_pruned_model_skips_the_random_init(tmp_path, monkeypatch):
    model = tiny_llama()
    _zero_groups(model, {"heads": torch.tensor([True, False, True, True])})
    x = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        ref = model(input_ids=x).logits
    export_structured_model(model, tmp_path / "n")
    calls = []
    original = LlamaForCausalLM._init_weights
    monkeypatch.setattr(LlamaForCausalLM, "_init_weights", lambda self, m: calls.append(m) or original(self, m))
    reloaded = load_pruned_model(tmp_path / "n")
    assert calls == []
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=x).logits, ref, atol=1e-5)
