"""Tiny random MoE configs of every supported family (transformers 5 fused-expert layouts)."""

from __future__ import annotations

import transformers

TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
FAMILIES = ["deepseek_v3", "deepseek_v2", "qwen3_moe", "qwen2_moe", "mixtral", "olmoe"]


def moe_config(arch: str, vocab: int = 400, layers: int = 3, experts: int = 8, top_k: int = 2):
    T = transformers
    common = dict(vocab_size=vocab, max_position_embeddings=128, **TOKENS)
    if arch == "deepseek_v3":
        return T.DeepseekV3Config(
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_routed_experts=experts,
            num_experts_per_tok=top_k,
            n_shared_experts=1,
            first_k_dense_replace=1,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            n_group=1,
            topk_group=1,
            **common,
        )
    if arch == "deepseek_v2":
        return T.DeepseekV2Config(
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_routed_experts=experts,
            num_experts_per_tok=top_k,
            n_shared_experts=1,
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            n_group=1,
            topk_group=1,
            topk_method="greedy",
            **common,
        )
    if arch == "qwen3_moe":
        return T.Qwen3MoeConfig(
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_experts=experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=16,
            **common,
        )
    if arch == "qwen2_moe":
        return T.Qwen2MoeConfig(
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            **common,
        )
    if arch == "mixtral":
        return T.MixtralConfig(
            hidden_size=32,
            intermediate_size=16,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=experts,
            num_experts_per_tok=top_k,
            **common,
        )
    if arch == "olmoe":
        return T.OlmoeConfig(
            hidden_size=32,
            intermediate_size=16,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=experts,
            num_experts_per_tok=top_k,
            **common,
        )
    raise ValueError(arch)
