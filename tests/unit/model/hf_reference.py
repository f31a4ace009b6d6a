"""Random tiny transformers.LlamaForCausalLM models: the independent reference for model tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def random_hf_llama(num_kv_heads: int = 2, tied: bool = False, rope_scaling=None, seed: int = 0,
                    vocab_size: int = 128) -> transformers.LlamaForCausalLM:
    """8 heads of 8 dims, 2 layers; random norm weights so a swapped norm shows in the logits."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=num_kv_heads, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=rope_scaling,
        tie_word_embeddings=tied, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def hf_logits(model: transformers.LlamaForCausalLM, tokens) -> np.ndarray:
    """Logits [B, T, vocab] of an unpadded token batch, float32 numpy."""
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
