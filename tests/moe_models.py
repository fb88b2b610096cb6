"""Tiny random mixture-of-experts models of four families, saved as transformers saves them
(one tensor per expert), for conversion, loading and runtime tests."""

from __future__ import annotations

import torch
from transformers import (AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig,
                          Qwen3MoeConfig)

ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")
_COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)


def moe_config(arch: str, **overrides):
    """Qwen3-MoE (top-k of 8, normalised), Qwen2-MoE (a shared expert with its gate), Mixtral
    (w1/w3/w2 names, block_sparse_moe in checkpoints), OLMoE (q/k norms)."""
    common = {**_COMMON, **overrides}
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(**common, head_dim=8, intermediate_size=64,
                              moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                              norm_topk_prob=True, decoder_sparse_step=1)
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(**common, intermediate_size=64, moe_intermediate_size=24,
                              shared_expert_intermediate_size=40, num_experts=8,
                              num_experts_per_tok=2)
    if arch == "mixtral":
        return MixtralConfig(**common, intermediate_size=24, num_local_experts=4,
                             num_experts_per_tok=2)
    if arch == "olmoe":
        return OlmoeConfig(**common, intermediate_size=24, num_experts=8,
                           num_experts_per_tok=2)
    raise ValueError(arch)


def random_moe(arch: str, dtype=torch.bfloat16, *, seed: int = 0, **overrides):
    """Weights scaled (gain 2 / sqrt(fan_in)) so greedy generation gives varied tokens."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(moe_config(arch, **overrides), dtype=dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                scale = 1.0 if "embed" in name else 2.0 / p.shape[-1] ** 0.5
                p.copy_(torch.randn(p.shape) * scale)
            else:
                p.copy_(torch.randn(p.shape) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def save_moe(arch: str, out_dir, dtype=torch.bfloat16, *, seed: int = 0, **overrides):
    """An HF checkpoint directory as transformers writes it (per-expert tensor names)."""
    model = random_moe(arch, dtype, seed=seed, **overrides)
    model.save_pretrained(out_dir)
    return out_dir
