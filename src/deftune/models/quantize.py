"""Replacing a model's linear layers by 4-bit NF4 ones (QLoRA, Dettmers et al. 2023, arXiv:2305.14314)
and back; the format and the layer are in :mod:`deftune.models.nf4_linear`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from deftune.models.arch import linear_sites
from deftune.models.nf4_linear import (
    ABSMAX_BLOCK_SIZE,
    NF4Linear,
    dequantize_absmax,
    quantize_absmax,
    quantize_nf4,
)
from deftune.models.surgery import replace_module

log = logging.getLogger(__name__)

QUANTIZED_ROLES = ("attention", "mlp", "expert")  # never the router: routing decisions are precision-bound

__all__ = ["NF4Linear", "quantize_nf4", "quantize_absmax", "dequantize_absmax", "quantize_model",
           "dequantize_model", "QuantizeStats", "ABSMAX_BLOCK_SIZE", "QUANTIZED_ROLES"]


def buffer_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.buffers())


@dataclass
class QuantizeStats:
    modules: int  # linear layers replaced by NF4Linear
    params: int  # weights they hold
    bytes_before: int  # their weights in the model dtype
    bytes_after: int  # codes + absmax codes + scales

    def summary(self) -> str:
        return (f"NF4: {self.modules} linear layers, {self.params:,} weights: {self.bytes_before:,} -> "
                f"{self.bytes_after:,} bytes ({self.bytes_after / max(self.params, 1):.3f} bytes/weight)")


@torch.no_grad()
def quantize_model(model: nn.Module) -> QuantizeStats:
    """Replace every attention / MLP / expert nn.Linear of the decoder layers by an NF4Linear (on its
    device, in its dtype as compute dtype). Embeddings, the LM head and routers stay as they are."""
    stats = QuantizeStats(0, 0, 0, 0)
    for site in linear_sites(model):
        module = model.get_submodule(site.name)
        if site.role not in QUANTIZED_ROLES or type(module) is not nn.Linear:
            continue
        quantized = NF4Linear.from_linear(module)
        replace_module(model, site.name, quantized)
        stats.modules += 1
        stats.params += module.weight.numel()
        stats.bytes_before += module.weight.numel() * module.weight.element_size()
        stats.bytes_after += buffer_bytes(quantized)
    log.info(stats.summary())
    return stats


@torch.no_grad()
def dequantize_model(model: nn.Module) -> int:
    """Replace every NF4Linear by a plain nn.Linear holding dequant(W) in its compute dtype (so the model
    saves as an ordinary checkpoint). Returns how many were replaced."""
    names = [name for name, m in model.named_modules() if isinstance(m, NF4Linear)]
    for name in names:
        layer = model.get_submodule(name)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=layer.device, dtype=layer.compute_dtype)
        linear.weight.copy_(layer.dequantize())
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
        linear.requires_grad_(False)
        replace_module(model, name, linear)
    return len(names)


def quantized_weight_count(model: nn.Module) -> int:
    """Weights held as NF4 codes (buffers, so ``model.parameters()`` does not count them)."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
