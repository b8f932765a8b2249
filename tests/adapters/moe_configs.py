"""Tiny random MoE configs of every supported family (transformers 5 fused-expert layouts)."""

from __future__ import annotations

import transformers

TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
FAMILIES = ["deepseek_v3", "deepseek_v2", "qwen3_moe", "qwen2_moe", "mixtral", "olmoe"]

# fmt: off
# DeepSeek-V2/V3: MLA attention, one shared expert, a dense first layer.
_DEEPSEEK = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_attention_heads=4,
                 num_key_value_heads=4, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                 qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1)
_SMALL = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
# fmt: on


def moe_config(arch: str, vocab: int = 400, layers: int = 3, experts: int = 8, top_k: int = 2):
    T = transformers
    common = dict(vocab_size=vocab, max_position_embeddings=128, num_hidden_layers=layers, **TOKENS)
    routed = dict(num_experts_per_tok=top_k, **common)
    if arch == "deepseek_v3":
        return T.DeepseekV3Config(**_DEEPSEEK, n_routed_experts=experts, q_lora_rank=16, **routed)
    if arch == "deepseek_v2":
        return T.DeepseekV2Config(**_DEEPSEEK, n_routed_experts=experts, q_lora_rank=None,
                                  topk_method="greedy", **routed)
    if arch == "qwen3_moe":
        return T.Qwen3MoeConfig(**_SMALL, intermediate_size=32, head_dim=8, num_experts=experts,
                                moe_intermediate_size=16, **routed)
    if arch == "qwen2_moe":
        return T.Qwen2MoeConfig(**_SMALL, intermediate_size=32, num_experts=experts, moe_intermediate_size=16,
                                shared_expert_intermediate_size=16, **routed)
    if arch == "mixtral":
        return T.MixtralConfig(**_SMALL, intermediate_size=16, num_local_experts=experts, **routed)
    if arch == "olmoe":
        return T.OlmoeConfig(**_SMALL, intermediate_size=16, num_experts=experts, **routed)
    raise ValueError(arch)
