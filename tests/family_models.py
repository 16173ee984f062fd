"""Tiny random models of every supported family (seconds to build and run), with the head each task uses."""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 64
LABELS = 5

# model_type (or a variant name) → (config class, config kwargs, head class)
FAMILY_CONFIGS: dict[str, tuple[type, dict, type]] = {
    "bert": (T.BertConfig, dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32),
             T.BertForTokenClassification),
    "roberta": (T.RobertaConfig, dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=40),
                T.RobertaForSequenceClassification),
    "distilbert": (T.DistilBertConfig, dict(dim=16, n_layers=2, n_heads=2, hidden_dim=32),
                   T.DistilBertForTokenClassification),
    "deberta-v2": (T.DebertaV2Config, dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=32, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                           position_buckets=4, max_relative_positions=16, share_att_key=True),
                   T.DebertaV2ForTokenClassification),
    "deberta-v2-sep": (T.DebertaV2Config, dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=32, relative_attention=True,
                                               pos_att_type=["p2c", "c2p"], position_buckets=4,
                                               max_relative_positions=16, share_att_key=False),
                       T.DebertaV2ForTokenClassification),
    "modernbert": (T.ModernBertConfig, dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                            intermediate_size=32, global_attn_every_n_layers=2, local_attention=4,
                                            pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                            sep_token_id=2),
                   T.ModernBertForTokenClassification),
    "llama": (T.LlamaConfig, dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=32), T.LlamaForCausalLM),
    "qwen2": (T.Qwen2Config, dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=32), T.Qwen2ForCausalLM),
    "mistral": (T.MistralConfig, dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=32, sliding_window=4),
                T.MistralForCausalLM),
    "gemma": (T.GemmaConfig, dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=32, head_dim=4), T.GemmaForCausalLM),
    "gemma2": (T.Gemma2Config, dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=32, head_dim=4, sliding_window=3), T.Gemma2ForCausalLM),
    "qwen3": (T.Qwen3Config, dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=32, head_dim=4), T.Qwen3ForCausalLM),
    "opt": (T.OPTConfig, dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
                              word_embed_proj_dim=16, max_position_embeddings=40), T.OPTForCausalLM),
    "gpt2": (T.GPT2Config, dict(n_embd=16, n_layer=2, n_head=2, n_positions=40), T.GPT2LMHeadModel),
    "t5": (T.T5Config, dict(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
                            decoder_start_token_id=0), T.T5ForConditionalGeneration),
}
FAMILIES = sorted(FAMILY_CONFIGS)

_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def tiny_family_model(name: str, seed: int = 0) -> torch.nn.Module:
    """The tiny random model of ``name`` (a key of `FAMILY_CONFIGS`), in eval mode (no dropout)."""
    config_cls, kwargs, head = FAMILY_CONFIGS[name]
    kwargs = {**_TOKEN_IDS, "vocab_size": VOCAB, "num_labels": LABELS, **kwargs}
    torch.manual_seed(seed)
    return head(config_cls(**kwargs)).eval()


def tiny_batches(name: str, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Two padded batches (right padding; lengths differ) of random token ids; T5 also gets explicit decoder
    inputs (the inputs shifted right) with their own padding."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for lengths in ([7, 5, 3], [6, 6]):
        ids = torch.randint(3, VOCAB, (len(lengths), max(lengths)), generator=gen)
        mask = torch.zeros_like(ids)
        for row, n in enumerate(lengths):
            mask[row, :n] = 1
        batch = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}
        if name == "t5":
            batch["decoder_input_ids"] = torch.cat([torch.zeros_like(ids[:, :1]), ids[:, :-1]], 1)
            batch["decoder_attention_mask"] = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], 1)
        batches.append(batch)
    return batches
