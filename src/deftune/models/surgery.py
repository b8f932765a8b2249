"""The patch layer: one place where the pieces of a model that faster kernels replace are found and
swapped (RMSNorm, rotary embedding, MLP, attention projections, LM head + loss).

Kernels (GPU issue) register a replacement per piece; ``pieces(model)`` tells what is there, so the log
can list what was patched and a model without a piece falls back to its own code, saying so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from deftune.models.arch import decoder_layers, linear_sites


@dataclass
class ModelPieces:
    """Named handles on the parts of a causal LM, by role."""

    layers: nn.ModuleList
    norms: list[tuple[str, nn.Module]] = field(default_factory=list)
    rotary: list[tuple[str, nn.Module]] = field(default_factory=list)
    mlps: list[tuple[str, nn.Module]] = field(default_factory=list)
    attention: list[tuple[str, nn.Module]] = field(default_factory=list)
    attention_projections: list[str] = field(default_factory=list)
    mlp_projections: list[str] = field(default_factory=list)
    lm_head: nn.Module | None = None

    def counts(self) -> dict[str, int]:
        return {
            "norms": len(self.norms),
            "rotary": len(self.rotary),
            "mlps": len(self.mlps),
            "attention": len(self.attention),
            "attention_projections": len(self.attention_projections),
            "mlp_projections": len(self.mlp_projections),
        }


def pieces(model: nn.Module) -> ModelPieces:
    found = ModelPieces(layers=decoder_layers(model))
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls.endswith("RMSNorm"):
            found.norms.append((name, module))
        elif "Rotary" in cls:
            found.rotary.append((name, module))
        elif name.endswith(".mlp") and not name.endswith("experts.mlp"):
            found.mlps.append((name, module))
        elif name.endswith(".self_attn"):
            found.attention.append((name, module))
    for site in linear_sites(model):
        if site.role == "attention":
            found.attention_projections.append(site.name)
        elif site.role == "mlp":
            found.mlp_projections.append(site.name)
    found.lm_head = model.get_output_embeddings()
    return found


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where ``name`` was; return the old module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def decoder_backbone(model: nn.Module) -> nn.Module:
    """The part of a CausalLM that returns hidden states (``model.model`` for HF causal LMs)."""
    backbone = getattr(model, "model", None)
    if backbone is None or not isinstance(backbone, nn.Module):
        raise ValueError(f"{type(model).__name__} has no .model backbone")
    return backbone


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the LM head the way the model's own forward does, soft-capping included (Gemma 2/3)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(model.config, "logit_scale", None)
    if scale and type(model).__name__.startswith("Cohere"):
        logits = logits * scale
    return logits
