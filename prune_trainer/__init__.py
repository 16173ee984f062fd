"""prune_trainer: training-time and one-shot pruning of Hugging Face models as `Trainer` callbacks."""

from prune_trainer.callbacks import (
    DistillationCallback,
    FiniteCheckCallback,
    FixedMaskCallback,
    FixedMaskOptions,
    MagnitudeOptions,
    MagnitudePruningCallback,
    MethodNeeds,
    MovementOptions,
    MovementPruningCallback,
    NMOptions,
    NMSparsityCallback,
    OBERTOptions,
    OBERTPruningCallback,
    PruningCallback,
    PruningContext,
    SparsityLoggingCallback,
    StructuredMovementCallback,
    StructuredMovementOptions,
    StructuredOptions,
    StructuredPruningCallback,
    TaylorOptions,
    TaylorPruningCallback,
    make_pruning_callback,
    register_method,
)
from prune_trainer.config import PruningConfig
from prune_trainer.data import load_conll_splits, make_compute_metrics, tokenize_and_align
from prune_trainer.data.span_corruption import span_corruption_pairs
from prune_trainer.data.text import calibration_windows, load_text, tokenize_text
from prune_trainer.export import (
    OrtTokenClassifier,
    convert_checkpoint,
    export_onnx,
    export_pruned_model,
    export_structured_model,
    load_pruned_model,
    quantize_onnx_int8,
    sparsity_report,
)
from prune_trainer.families import MODEL_FAMILIES, ModelFamily
from prune_trainer.llm import (
    PerplexityResult,
    load_causal_lm,
    mask_lora_updates,
    merge_lora_keep_mask,
    perplexity,
    seq2seq_perplexity,
)
from prune_trainer.masking import (
    MaskedConv1D,
    MaskedLinear,
    find_target_linears,
    inject_masked_layers,
    unwrap_masked_layers,
)
from prune_trainer.models import load_model_and_tokenizer
from prune_trainer.oneshot.runner import OneShotConfig, run_oneshot
from prune_trainer.oneshot.surgeon import SurgeonOptions
from prune_trainer.options import Options
from prune_trainer.recipes.lottery import LotteryConfig, run_lottery
from prune_trainer.schedules import PruningSchedule
from prune_trainer.structures import find_structures
from prune_trainer.tasks import TASKS, load_model_for_task

__version__ = "0.1.0"

__all__ = [
    # training-time methods and their options
    "PruningCallback", "MethodNeeds", "PruningContext", "make_pruning_callback", "register_method",
    "MagnitudePruningCallback", "MagnitudeOptions", "MovementPruningCallback", "MovementOptions",
    "OBERTPruningCallback", "OBERTOptions", "NMSparsityCallback", "NMOptions",
    "TaylorPruningCallback", "TaylorOptions", "StructuredPruningCallback", "StructuredOptions",
    "StructuredMovementCallback", "StructuredMovementOptions", "FixedMaskCallback", "FixedMaskOptions",
    # other callbacks
    "DistillationCallback", "FiniteCheckCallback", "SparsityLoggingCallback",
    # configuration
    "Options", "PruningConfig", "PruningSchedule",
    # masking and export
    "MaskedLinear", "MaskedConv1D", "inject_masked_layers", "unwrap_masked_layers", "find_target_linears",
    "export_pruned_model", "sparsity_report",
    "export_structured_model", "load_pruned_model", "find_structures",
    # deployment: compressed checkpoints, ONNX Runtime
    "convert_checkpoint", "export_onnx", "quantize_onnx_int8", "OrtTokenClassifier",
    # one-shot pruning
    "OneShotConfig", "run_oneshot", "SurgeonOptions",
    # model families and tasks
    "MODEL_FAMILIES", "ModelFamily", "TASKS", "load_model_for_task",
    # lottery tickets (iterative magnitude pruning with rewinding)
    "LotteryConfig", "run_lottery",
    # models and data
    "load_model_and_tokenizer", "load_conll_splits", "tokenize_and_align", "make_compute_metrics",
    # causal language models: loading, text, perplexity, LoRA
    "load_causal_lm", "load_text", "tokenize_text", "calibration_windows", "perplexity", "PerplexityResult",
    "merge_lora_keep_mask", "mask_lora_updates",
    # seq2seq (T5): target-token perplexity, span corruption
    "seq2seq_perplexity", "span_corruption_pairs",
]
