"""Optional GPU export: turn 2:4-sparse `nn.Linear` weights into `torch.sparse.to_sparse_semi_structured` tensors.

The plain export (`export_pruned_model`) stores the weights densely with zeros; this conversion is done at load
time, on the inference GPU, because the compressed 2:4 format (values + 2-bit metadata) is only implemented for
CUDA tensors on GPUs of compute capability ≥ 8.0 (Ampere and later), in fp16/bf16/int8 (cuSPARSELt also fp8),
for weights whose dimensions are multiples of the backend's minimum tile (PyTorch semi-structured tutorial).
On CPU `require_semi_structured_support` raises a `RuntimeError` saying so: there is no CPU kernel.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from prune_trainer.masking.selection import check_nm


def nm_group_counts(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Non-zeros in every group of ``m`` consecutive weights along the input (last) dimension: ``[out, in/m]``."""
    out_f, in_f = weight.shape
    if in_f % m:
        raise ValueError(f"in_features={in_f} is not divisible by M={m}")
    return (weight.detach() != 0).reshape(out_f, in_f // m, m).sum(-1)


def is_nm_sparse(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every group of ``m`` consecutive input weights holds at most ``n`` non-zeros."""
    check_nm(n, m)
    return weight.shape[-1] % m == 0 and bool((nm_group_counts(weight, m) <= n).all())


def nm_compliance_report(
    model: nn.Module, n: int = 2, m: int = 4, layer_names: Iterable[str] | None = None
) -> dict[str, Any]:
    """Which Linear layers satisfy N:M: ``{"pattern", "compliant": [...], "not_compliant": {name: reason}}``.

    Default layers: every `nn.Linear` of the model (embeddings' projections, classifier included), so layers
    left dense by design (classifier, skipped layers) are listed with their reason.
    """
    check_nm(n, m)
    if layer_names is None:
        layer_names = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    compliant, bad = [], {}
    for name in layer_names:
        weight = model.get_submodule(name).weight
        if weight.shape[-1] % m:
            bad[name] = f"in_features={weight.shape[-1]} not divisible by {m}"
            continue
        worst = int(nm_group_counts(weight, m).max())
        if worst > n:
            bad[name] = f"a group of {m} holds {worst} > {n} non-zeros"
        else:
            compliant.append(name)
    return {"pattern": f"{n}:{m}", "compliant": compliant, "not_compliant": bad}


def require_semi_structured_support(device: torch.device | str | None = None) -> None:
    """Raise a clear `RuntimeError` unless ``device`` is a CUDA GPU with 2:4 sparse tensor cores (sm ≥ 80)."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        raise RuntimeError(
            f"2:4 semi-structured sparse kernels need a CUDA GPU of compute capability ≥ 8.0 (Ampere or newer); "
            f"got device {device} (cuda available: {torch.cuda.is_available()}). On CPU keep the plain export: "
            "its zeros run through the dense kernels, with no speedup."
        )
    if not torch.cuda.is_available():
        raise RuntimeError("2:4 semi-structured sparse kernels need CUDA, but torch.cuda.is_available() is False")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise RuntimeError(
            f"2:4 semi-structured sparse kernels need compute capability ≥ 8.0, "
            f"{torch.cuda.get_device_name(device)} has {major}.{minor}"
        )


def to_semi_structured(
    model: nn.Module, layer_names: Iterable[str] | None = None, strict: bool = False
) -> dict[str, Any]:
    """Replace the weight of every 2:4-sparse Linear of ``model`` (already on the GPU, fp16/bf16) in place by its
    compressed `to_sparse_semi_structured` form (inference only: the weights stop requiring grad).

    Layers that are not 2:4 (e.g. the classifier) or whose shape/dtype the kernels reject are left dense and
    listed under ``"skipped"`` with the reason; ``strict=True`` raises instead. Returns
    ``{"converted": [...], "skipped": {name: reason}}``.
    """
    from torch.sparse import to_sparse_semi_structured

    params = list(model.parameters())
    if not params:
        raise ValueError("model has no parameters to convert")
    require_semi_structured_support(params[0].device)
    if layer_names is None:
        layer_names = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    converted, skipped = [], {}
    for name in layer_names:
        layer = model.get_submodule(name)
        weight = layer.weight.detach()
        if not is_nm_sparse(weight, 2, 4):
            skipped[name] = "weight is not 2:4 sparse"
        else:
            try:
                layer.weight = nn.Parameter(to_sparse_semi_structured(weight.contiguous()), requires_grad=False)
                converted.append(name)
                continue
            except RuntimeError as err:  # shape or dtype the backend does not support
                skipped[name] = str(err).splitlines()[0]
        if strict:
            raise RuntimeError(f"layer {name} was not converted to 2:4 semi-structured: {skipped[name]}")
    if not converted:
        raise RuntimeError(f"no layer could be converted to 2:4 semi-structured; reasons: {skipped}")
    return {"converted": converted, "skipped": skipped}


def load_semi_structured(
    path: str, dtype: torch.dtype = torch.float16, device: str = "cuda"
) -> tuple[nn.Module, dict[str, Any]]:
    """Load an exported pruned checkpoint for inference on the GPU with its 2:4 layers compressed."""
    from transformers import AutoModelForTokenClassification

    require_semi_structured_support(device)
    model = AutoModelForTokenClassification.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, to_semi_structured(model)
