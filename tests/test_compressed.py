"""Compressed checkpoints: bitmask / N:M / INT8 round trips, file size = formula, clear errors, no pickle."""

import json
import pickle
import struct

import pytest
import torch
from helpers import tiny_bert, tiny_tokenizer, zero_ffn_neurons
from torch import nn
from transformers import AutoModelForTokenClassification

from prune_trainer import export_pruned_model, export_structured_model, load_pruned_model
from prune_trainer.export.compressed import LAYOUT_FILE, WEIGHTS_FILE, expected_bytes
from prune_trainer.export.packing import (
    bitmask_decode,
    bitmask_encode,
    nm_decode,
    nm_encode,
    pack_bits,
    quantize_int8,
    unpack_bits,
)


def encoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".encoder." in n}


def pruned_bert(sparsity: float = 0.9, nm: tuple[int, int] | None = None, seed: int = 0) -> nn.Module:
    """A tiny BERT whose encoder Linears are pruned by magnitude (per layer, or N:M along the inputs) as ``W ⊙ M``
    (so pruned negative weights are -0.0, as a masked training export gives)."""
    model = tiny_bert(seed=seed, vocab_size=64)
    with torch.no_grad():
        for layer in encoder_linears(model).values():
            w = layer.weight
            if nm:
                n, m = nm
                groups = w.abs().reshape(w.shape[0], -1, m)
                keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(n, -1).indices, True)
                mask = keep.reshape(w.shape)
            else:
                k = int(w.numel() * sparsity)
                mask = w.abs() > w.abs().flatten().kthvalue(k).values
            w.copy_(w * mask)
    return model.eval()


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if sa[k].is_floating_point():
            assert bits_equal(sa[k], sb[k]), k
        else:
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("count", [1, 7, 8, 9, 1000])
def test_bits_pack_and_unpack(count):
    bits = torch.rand(count, generator=torch.Generator().manual_seed(count)) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (count + 7) // 8
    assert torch.equal(unpack_bits(packed, count), bits)
    with pytest.raises(ValueError, match="needs"):
        unpack_bits(packed[:-1], count)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8), (4, 16), (1, 2)])
def test_nm_encoding_round_trip_is_exact(n, m):
    w = torch.randn(6, 4 * m)
    groups = w.reshape(6, -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(n, -1).indices, True)
    w = w * keep.reshape(w.shape) + 0.0
    w[0, :m] = 0.0  # a group with fewer than N non-zeros: zeros as filler
    values, index = nm_encode(w, n, m)
    assert values.shape == (6, 4 * n)
    assert index.numel() == -(-6 * 4 * n * max(1, (m - 1).bit_length()) // 8)
    assert bits_equal(nm_decode(values, index, tuple(w.shape), n, m), w)


def test_bitmask_encoding_round_trip_and_corrupt_count():
    w = torch.randn(5, 13) * (torch.rand(5, 13) > 0.8) + 0.0
    mask, values = bitmask_encode(w)
    assert values.numel() == int((w != 0).sum())
    assert bits_equal(bitmask_decode(mask, values, (5, 13)), w)
    with pytest.raises(ValueError, match="set bits"):
        bitmask_decode(mask, values[:-1], (5, 13))


def test_int8_is_within_half_a_step_and_keeps_zeros():
    w = torch.randn(8, 40) * (torch.rand(8, 40) > 0.9)
    w[3] = 0.0  # an all-zero row
    q, scale = quantize_int8(w)
    approx = q.float() * scale[:, None]
    assert q.dtype == torch.int8 and torch.equal(scale[3], torch.tensor(1.0))
    assert bool(((approx - w).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all())
    assert torch.equal(approx[w == 0], torch.zeros(int((w == 0).sum())))


@pytest.mark.parametrize("fmt,nm", [("bitmask", None), ("nm", (2, 4)), ("nm", (1, 4)), ("dense", None)])
def test_checkpoint_round_trip_is_bit_identical_to_the_dense_export(tmp_path, fmt, nm):
    tok = tiny_tokenizer()
    pattern = f"{nm[0]}:{nm[1]}" if nm else "unstructured"
    export_pruned_model(pruned_bert(nm=nm), tmp_path / "dense", tok, pattern=pattern)
    export_pruned_model(pruned_bert(nm=nm), tmp_path / "packed", tok, pattern=pattern, format=fmt,
                        embedding_rank=None if fmt != "dense" else 8)
    plain = AutoModelForTokenClassification.from_pretrained(tmp_path / "dense").eval()
    loaded = load_pruned_model(tmp_path / "packed")
    if fmt == "dense":  # with the embeddings factorized: everything but the word embeddings is exact
        emb = "bert.embeddings.word_embeddings.weight"
        assert torch.linalg.matrix_rank(loaded.state_dict()[emb]) <= 8
        loaded.state_dict()[emb].copy_(plain.state_dict()[emb])
    else:
        layout = json.loads((tmp_path / "packed" / LAYOUT_FILE).read_text())
        assert {e["encoding"] for e in layout["entries"].values()} == {fmt}
        assert len(layout["entries"]) == 12  # the encoder's Linears; classifier and the rest as is
        assert not (tmp_path / "packed" / "model.safetensors").exists()
    assert_same_state(load_pruned_model(tmp_path / "dense"), plain)
    assert_same_state(loaded, plain)


@pytest.mark.parametrize("fmt", ["bitmask", "nm", "dense"])
def test_int8_checkpoint_round_trip(tmp_path, fmt):
    model = pruned_bert(nm=(2, 4) if fmt == "nm" else None)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    export_pruned_model(model, tmp_path / "q", tiny_tokenizer(), format=fmt, quantize="int8", pattern="2:4")
    loaded = load_pruned_model(tmp_path / "q").state_dict()
    quantized = 0
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        w, got = original[f"{name}.weight"], loaded[f"{name}.weight"]
        half_step = w.abs().amax(dim=1, keepdim=True) / 127 / 2
        assert bool(((got - w).abs() <= half_step * (1 + 1e-5) + 1e-12).all()), name
        assert bool((got[w == 0] == 0).all()), name  # zeros stay exactly zero
        quantized += 1
    assert quantized == 12 + 1 + 3  # encoder Linears, classifier, word/position/token-type embeddings
    for name in ("bert.embeddings.LayerNorm.weight", "bert.encoder.layer.0.attention.self.query.bias"):
        assert bits_equal(loaded[name], original[name])  # everything else as is


def _tensor_bytes(path) -> tuple[dict[str, int], int]:
    """Bytes of each tensor in a safetensors file (from its header) and the header's size."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    sizes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    return sizes, 8 + header_len


@pytest.mark.parametrize("fmt,quantize", [("bitmask", None), ("bitmask", "int8"), ("nm", None), ("nm", "int8")])
def test_file_size_equals_the_formula(tmp_path, fmt, quantize):
    model = pruned_bert(nm=(2, 4) if fmt == "nm" else None)
    nnz = {f"{n}.weight": int((m.weight != 0).sum()) for n, m in encoder_linears(model).items()}
    export_pruned_model(model, tmp_path / "c", format=fmt, quantize=quantize, pattern="2:4")
    sizes, header = _tensor_bytes(tmp_path / "c" / WEIGHTS_FILE)
    layout = json.loads((tmp_path / "c" / LAYOUT_FILE).read_text())
    assert (tmp_path / "c" / WEIGHTS_FILE).stat().st_size == header + sum(sizes.values()) == layout["file_bytes"]
    for name, entry in layout["entries"].items():
        stored = sum(size for key, size in sizes.items() if key.rsplit(".", 1)[0] == name)
        shape = tuple(entry["shape"])
        if name in nnz:
            assert entry["encoding"] == fmt
            assert stored == expected_bytes(shape, nnz[name], fmt, quantize), name
        else:
            assert stored == expected_bytes(shape, 0, "dense", quantize), name
    if fmt == "bitmask" and quantize:  # a 90%-sparse INT8 layer ≈ nnz bytes + n/8 (+ 4 bytes per row of scales)
        name = "bert.encoder.layer.0.intermediate.dense.weight"
        out_f, in_f = layout["entries"][name]["shape"]
        assert nnz[name] <= 0.1 * out_f * in_f + 1
        assert expected_bytes((out_f, in_f), nnz[name], fmt, quantize) == nnz[name] + out_f * in_f // 8 + 4 * out_f


def test_nm_format_on_a_layer_that_is_not_nm_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.0\..*is not 2:4 sparse: a group of 4 inputs holds"):
        export_pruned_model(pruned_bert(sparsity=0.6), tmp_path / "x", format="nm", pattern="2:4")
    assert list(tmp_path.iterdir()) == []  # nothing written
    with pytest.raises(ValueError, match="format must be one of"):
        export_pruned_model(pruned_bert(), tmp_path / "x", format="coo")
    with pytest.raises(ValueError, match="quantize must be"):
        export_pruned_model(pruned_bert(), tmp_path / "x", quantize="int4")


def test_truncated_or_corrupt_file_is_a_clear_error(tmp_path):
    export_pruned_model(pruned_bert(), tmp_path / "c", format="bitmask", quantize="int8")
    weights = tmp_path / "c" / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        load_pruned_model(tmp_path / "c")
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupt"):
        load_pruned_model(tmp_path / "c")
    weights.write_bytes(data)
    layout = json.loads((tmp_path / "c" / LAYOUT_FILE).read_text())
    entry = next(iter(layout["entries"]))
    layout["raw"].remove("classifier.bias")  # a layout that does not describe the file: still no wrong model
    layout["entries"][entry]["shape"][0] += 1
    (tmp_path / "c" / LAYOUT_FILE).write_text(json.dumps(layout))
    with pytest.raises(ValueError):
        load_pruned_model(tmp_path / "c")


def test_loading_reads_no_pickle(tmp_path, monkeypatch):
    export_pruned_model(pruned_bert(), tmp_path / "c", tiny_tokenizer(), format="bitmask", quantize="int8")

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle/torch.load used while loading a compressed checkpoint")

    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, name, forbidden)
    model = load_pruned_model(tmp_path / "c")
    assert isinstance(model, nn.Module) and not model.training


def test_structured_int8_bitmask_round_trip(tmp_path):
    model = tiny_bert(vocab_size=64, num_attention_heads=4)
    zero_ffn_neurons(model, 32)  # half the FFN neurons of every layer
    export_structured_model(model, tmp_path / "s_dense")
    small = load_pruned_model(tmp_path / "s_dense")
    assert small.bert.encoder.layer[0].intermediate.dense.weight.shape == (32, 32)
    export_pruned_model(small, tmp_path / "s_q", format="bitmask", quantize="int8")
    loaded = load_pruned_model(tmp_path / "s_q")
    assert loaded.bert.encoder.layer[1].output.dense.weight.shape == (32, 32)
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, small(input_ids=x).logits, atol=0.05, rtol=0)


def test_export_command_compresses_a_model_folder(tmp_path, capsys):
    from prune_trainer.cli import main

    export_pruned_model(pruned_bert(), tmp_path / "plain", tiny_tokenizer(), method="magnitude")
    assert main(["export", str(tmp_path / "plain"), str(tmp_path / "small"), "--quantize", "int8"]) == 0
    assert "x smaller" in capsys.readouterr().out
    report = json.loads((tmp_path / "small" / "sparsity.json").read_text())
    assert report["method"] == "magnitude" and report["compression"]["quantize"] == "int8"
    assert (tmp_path / "small" / "tokenizer.json").is_file()
    assert load_pruned_model(tmp_path / "small").config.vocab_size == 64
    assert main(["export", str(tmp_path / "plain"), str(tmp_path / "nm"), "--format", "nm"]) == 2  # not 2:4
    assert "is not 2:4 sparse" in capsys.readouterr().err and not (tmp_path / "nm").exists()


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_trimmed_vocabulary_keeps_the_used_rows_and_maps_the_rest_to_unk(tmp_path, quantize):
    from prune_trainer.data import used_token_ids
    from prune_trainer.data.conll import Sentence

    tok = tiny_tokenizer()
    model = tiny_bert()
    used = used_token_ids([Sentence(["alvo", "went", "to", "ostra"], ["B-PER", "O", "O", "B-LOC"])], tok)
    assert {tok.cls_token_id, tok.sep_token_id, tok.unk_token_id, tok.convert_tokens_to_ids("alvo")} <= set(used)
    export_pruned_model(model, tmp_path / "t", tok, quantize=quantize, embedding_rows=used)
    emb = load_pruned_model(tmp_path / "t").bert.embeddings.word_embeddings.weight
    original = model.bert.embeddings.word_embeddings.weight.detach()
    dropped = sorted(set(range(original.shape[0])) - set(used))
    step = original.abs().amax(1) / 127 / 2 if quantize else torch.zeros(original.shape[0])
    assert bool(((emb[used] - original[used]).abs() <= step[used, None] * (1 + 1e-5)).all())
    assert torch.equal(emb[dropped], emb[tok.unk_token_id].expand(len(dropped), -1))
    sizes, _ = _tensor_bytes(tmp_path / "t" / WEIGHTS_FILE)
    name = "bert.embeddings.word_embeddings.weight"
    stored = sum(v for k, v in sizes.items() if k.rsplit(".", 1)[0] == name)
    per_value = 1 if quantize else 4
    assert stored == len(used) * 32 * per_value + (len(used) * 4 if quantize else 0) + -(-original.shape[0] // 8)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        export_pruned_model(tiny_bert(), tmp_path / "u", embedding_rows=used)


def test_int4_embeddings_within_half_a_step_with_the_size_of_the_formula(tmp_path):
    from prune_trainer.export.packing import dequantize_int4, quantize_int4

    w = torch.randn(5, 256) * (torch.rand(5, 256) > 0.3)
    packed, scale = quantize_int4(w, 128)
    assert packed.shape == (5, 128) and scale.shape == (5, 2) and scale.dtype == torch.float16
    back = dequantize_int4(packed, scale, 128)
    step = scale.float().repeat_interleave(128, dim=1)
    assert bool(((back - w).abs() <= step / 2 * (1 + 1e-3)).all()) and bool((back[w == 0] == 0).all())
    with pytest.raises(ValueError, match="do not tile"):
        quantize_int4(w, 96)

    model = pruned_bert()
    original = model.bert.embeddings.word_embeddings.weight.detach().clone()
    export_pruned_model(model, tmp_path / "e", tiny_tokenizer(), format="bitmask", quantize="int8",
                        embedding_quant="int4")
    layout = json.loads((tmp_path / "e" / LAYOUT_FILE).read_text())
    name = "bert.embeddings.word_embeddings.weight"
    assert layout["entries"][name]["quant"] == "int4" and layout["entries"][name]["group"] == 32  # hidden 32
    assert layout["entries"]["bert.embeddings.position_embeddings.weight"]["quant"] == "int8"
    got = load_pruned_model(tmp_path / "e").bert.embeddings.word_embeddings.weight
    half_step = original.abs().amax(1, keepdim=True) / 7 / 2
    assert bool(((got - original).abs() <= half_step * (1 + 1e-3) + 1e-7).all())
    sizes, _ = _tensor_bytes(tmp_path / "e" / WEIGHTS_FILE)
    assert sizes[f"{name}.values"] + sizes[f"{name}.scale"] == 64 * 32 // 2 + 64 * 2  # vocab 64, hidden 32


def test_bf16_bitmask_round_trip_keeps_the_dtype(tmp_path):
    model = pruned_bert().to(torch.bfloat16)
    export_pruned_model(model, tmp_path / "plain")
    export_pruned_model(pruned_bert().to(torch.bfloat16), tmp_path / "packed", format="bitmask")
    plain, packed = load_pruned_model(tmp_path / "plain"), load_pruned_model(tmp_path / "packed")
    assert packed.bert.encoder.layer[0].output.dense.weight.dtype == torch.bfloat16
    for name, tensor in plain.state_dict().items():
        assert torch.equal(packed.state_dict()[name].view(torch.int16) if tensor.is_floating_point() else
                           packed.state_dict()[name], tensor.view(torch.int16) if tensor.is_floating_point() else
                           tensor), name
