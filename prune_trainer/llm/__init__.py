"""Causal language models: loading (the embedded SmolLM2-135M), perplexity, pruning with LoRA adapters; seq2seq
(T5) target-token perplexity."""

from prune_trainer.llm.lora import lora_base_masks, mask_lora_updates, merge_lora_keep_mask
from prune_trainer.llm.models import EMBEDDED_LLM, embedded_llm_path, load_causal_lm
from prune_trainer.llm.perplexity import PerplexityResult, perplexity, perplexity_windows
from prune_trainer.llm.seq2seq import Seq2SeqPerplexity, seq2seq_perplexity

__all__ = [
    "EMBEDDED_LLM",
    "PerplexityResult",
    "Seq2SeqPerplexity",
    "embedded_llm_path",
    "load_causal_lm",
    "lora_base_masks",
    "mask_lora_updates",
    "merge_lora_keep_mask",
    "perplexity",
    "perplexity_windows",
    "seq2seq_perplexity",
]
