"""Export: plain `save_pretrained` checkpoints with zeros baked in, plus a sparsity report; compressed checkpoints
(bitmask / N:M sparse, INT8); structurally pruned models sliced to their kept heads and neurons
(`export_structured_model`, `load_pruned_model`); ONNX export and ONNX Runtime inference (`runtime`)."""

from prune_trainer.export.compressed import CompressionSpec, read_compressed
from prune_trainer.export.convert import convert_checkpoint
from prune_trainer.export.export import (
    SPARSITY_FILE,
    export_pruned_model,
    has_model_weights,
    is_complete_model_dir,
    sparsity_report,
)
from prune_trainer.export.runtime import OrtTokenClassifier, export_onnx, quantize_onnx_int8, quantize_torch_dynamic
from prune_trainer.export.structured import STRUCTURE_FIELD, export_structured_model, load_pruned_model, slice_model

__all__ = [
    "CompressionSpec", "OrtTokenClassifier", "convert_checkpoint", "export_onnx", "quantize_onnx_int8",
    "quantize_torch_dynamic", "read_compressed",
    "SPARSITY_FILE", "STRUCTURE_FIELD", "export_pruned_model", "export_structured_model", "has_model_weights",
    "is_complete_model_dir", "load_pruned_model", "slice_model", "sparsity_report",
]
