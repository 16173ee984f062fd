"""Causal language models: loading (the embedded SmolLM2-135M), perplexity, pruning with LoRA adapters."""

from prune_trainer.llm.lora import lora_base_masks, mask_lora_updates, merge_lora_keep_mask
from prune_trainer.llm.models import EMBEDDED_LLM, embedded_llm_path, load_causal_lm
from prune_trainer.llm.perplexity import PerplexityResult, perplexity, perplexity_windows

__all__ = [
    "EMBEDDED_LLM",
    "PerplexityResult",
    "embedded_llm_path",
    "load_causal_lm",
    "lora_base_masks",
    "mask_lora_updates",
    "merge_lora_keep_mask",
    "perplexity",
    "perplexity_windows",
]
