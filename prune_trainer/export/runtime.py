"""CPU inference runtimes for exported models: ONNX export, ONNX Runtime (fp32 and dynamic INT8), and PyTorch's
dynamic INT8 (`torch.ao.quantization.quantize_dynamic`) for comparison.

Dynamic INT8 (Jacob et al. 2018): weights are INT8 per output channel, activations are quantized per tensor at
run time from their observed range, ``y ≈ s_x s_w (q_x · q_w)`` with INT32 accumulation. ONNX Runtime is the
maintained path (the ONNX file is what deployments load; its quantizer and kernels are actively developed);
``torch.ao``'s quantized tensors are deprecated (pytorch/pytorch#184982) and kept here only as a measurement.
onnx and onnxruntime are the optional extra ``deploy`` (``pip install prune-trainer[deploy]``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import TokenClassifierOutput

from prune_trainer.io import atomic_file

ONNX_INPUTS = ("input_ids", "attention_mask")


def _require(module: str) -> Any:
    """Import an optional dependency of the ``deploy`` extra, with a clear error when it is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{module} is needed for ONNX export and inference: pip install 'prune-trainer[deploy]'"
                          ) from None


class _LogitsOnly(nn.Module):
    """``(input_ids, attention_mask) → logits``: the graph ONNX export traces."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def export_onnx(model: nn.Module, path: str | os.PathLike, opset: int = 17) -> Path:
    """Write ``model`` (a token classifier, fp32, CPU) as an ONNX graph ``(input_ids, attention_mask) → logits``
    with dynamic batch and sequence axes (TorchScript exporter), atomically. Works for sliced structured models
    (their smaller Linears are ordinary MatMuls). Returns ``path``."""
    _require("onnx")
    path = Path(path)
    was_training = model.training
    wrapper = _LogitsOnly(model).eval()  # eval() on the wrapper: the exporter restores the wrapper's mode after
    vocab = int(getattr(model.config, "vocab_size", 100))
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # trace with padding, so that no branch for an all-ones mask is baked into the graph
    axes = {name: {0: "batch", 1: "sequence"} for name in (*ONNX_INPUTS, "logits")}
    try:
        with atomic_file(path) as tmp, torch.no_grad():
            torch.onnx.export(wrapper, (ids, mask), str(tmp), input_names=list(ONNX_INPUTS),
                              output_names=["logits"], dynamic_axes=axes, opset_version=opset, dynamo=False)
    finally:
        model.train(was_training)
    return path


def quantize_onnx_int8(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """ONNX Runtime dynamic quantization of ``src`` into ``dst`` (atomically): MatMul weights INT8 per output
    channel (symmetric), Gather (embedding) tables INT8, activations quantized at run time. Returns ``dst``."""
    quantization = _require("onnxruntime.quantization")
    with atomic_file(dst) as tmp:
        quantization.quantize_dynamic(str(src), str(tmp), weight_type=quantization.QuantType.QInt8, per_channel=True)
    return Path(dst)


class OrtTokenClassifier:
    """An ONNX Runtime session that answers like a HF token classifier: ``model(**batch).logits`` (a torch
    tensor), so `evaluate_f1` and the benchmarks run it unchanged. ``threads``: intra-op threads; ``spinning``:
    whether idle pool threads busy-wait for the next call (ORT's default; off in side-by-side benchmarks, so they do
    not steal the cores of the model timed next)."""

    def __init__(self, path: str | os.PathLike, threads: int = 2, spinning: bool = True):
        ort = _require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.device = torch.device("cpu")

    def eval(self) -> OrtTokenClassifier:
        return self

    def __call__(self, **batch: torch.Tensor) -> TokenClassifierOutput:
        missing = [name for name in self.inputs if name not in batch]
        if missing:
            raise ValueError(f"{self.path.name} needs inputs {missing}")
        feed = {name: np.ascontiguousarray(batch[name].cpu().numpy().astype(np.int64)) for name in self.inputs}
        return TokenClassifierOutput(logits=torch.from_numpy(self.session.run(["logits"], feed)[0]))


def quantize_torch_dynamic(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every `nn.Linear` replaced by PyTorch's dynamic INT8 Linear (weights per output
    channel, activations per tensor at run time; `torch.ao.quantization.quantize_dynamic`, deprecated API)."""
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear: per_channel_dynamic_qconfig},
                                dtype=torch.qint8)
