"""Mixture-of-Experts facts: where the routed experts and their router sit in a decoder layer.

transformers 5 ships every supported MoE family (DeepSeek-V2/V3, Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE)
with one layout, which is what deftune relies on:

    layer.mlp.gate      router:  forward(h [T, H]) -> (logits [T, E], weights [T, K], index [T, K])
    layer.mlp.experts   experts: gate_up_proj [E, 2I, H], down_proj [E, H, I] (fused 3D tensors);
                                 forward(h [T, H], top_k_index, top_k_weights) -> [T, H]
    layer.mlp.shared_experts / shared_expert   dense MLP every token passes (DeepSeek, Qwen2-MoE)

Dense layers (DeepSeek's ``first_k_dense_replace``) have no router and are skipped. Older per-expert
ModuleList layouts (transformers 4) are refused with a clear error rather than half-supported.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from deftune.errors import DeftuneError
from deftune.models.arch import decoder_layers

_SHARED_NAMES = ("shared_experts", "shared_expert")


@dataclass
class MoeBlock:
    """One MoE feed-forward block of decoder layer ``layer``."""

    layer: int
    name: str  # dotted path of the block, e.g. model.layers.1.mlp
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    shared: nn.Module | None
    shared_name: str | None

    @property
    def num_experts(self) -> int:
        return (
            int(self.experts.gate_up_proj.shape[0])
            if hasattr(self.experts, "gate_up_proj")
            else int(getattr(self.experts, "num_experts"))
        )

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)


def _is_fused_experts(module: nn.Module) -> bool:
    up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return getattr(up, "ndim", 0) == 3 and getattr(down, "ndim", 0) == 3


def moe_blocks(model: nn.Module) -> list[MoeBlock]:
    """Every MoE block of ``model`` in layer order (empty for a dense model)."""
    out = []
    prefix = _layers_prefix(model)
    for index, layer in enumerate(decoder_layers(model)):
        for child_name in ("mlp", "block_sparse_moe", "feed_forward", "moe"):
            block = getattr(layer, child_name, None)
            if block is None:
                continue
            experts = getattr(block, "experts", None)
            router = getattr(block, "gate", None) or getattr(block, "router", None)
            if experts is None or router is None:
                continue
            if not _is_fused_experts(experts) and not hasattr(experts, "base_gate_up"):
                raise DeftuneError(
                    f"{type(model).__name__} layer {index}: experts are not stored as fused 3D tensors "
                    "(gate_up_proj [E, 2I, H]); deftune's expert methods need transformers >= 5 layouts"
                )
            shared, shared_name = None, None
            for s in _SHARED_NAMES:
                if getattr(block, s, None) is not None:
                    shared, shared_name = getattr(block, s), f"{prefix}.{index}.{child_name}.{s}"
            out.append(
                MoeBlock(index, f"{prefix}.{index}.{child_name}", block, router, experts, shared, shared_name)
            )
            break
    return out


def _layers_prefix(model: nn.Module) -> str:
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise DeftuneError(f"cannot name the decoder layers of {type(model).__name__}")


def require_moe(model: nn.Module, purpose: str) -> list[MoeBlock]:
    blocks = moe_blocks(model)
    if not blocks:
        raise DeftuneError(
            f"{purpose} needs a Mixture-of-Experts model; {type(model).__name__} has no routed "
            "experts (supported: DeepSeek-V2/V3, Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE)"
        )
    return blocks
