"""The LoRA layer: a frozen linear map plus a trainable low-rank update.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685):

    h = W0 x + s * B A x,   A in R^{r x d_in}, B in R^{d_out x r},   s = alpha / r

or s = alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023, arXiv:2312.03732). B starts at zero, so the
adapted model equals the base model at step 0. deftune owns this module (instead of using PEFT's) so later
work can resize r per module, mask gradients and swap fused kernels; PEFT's file format is kept.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class LoRALinear(nn.Module):
    """``base_layer`` (frozen nn.Linear) + ``lora_B(lora_A(dropout(x))) * scaling``.

    Attribute names match PEFT's (``base_layer``, ``lora_A``, ``lora_B``) so saved keys line up.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self.base_layer = base
        self.rank = rank
        self.alpha = alpha
        self.rslora = rslora
        self.scaling = lora_scaling(alpha, rank, rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = dict(device=base.weight.device, dtype=torch.float32)
        # Adapter weights stay in float32 (master weights) even over a bf16 base: small updates to
        # B A would otherwise round away.
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        self.reset_parameters()
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        # Some model code reads `.weight` of its projections (dtype/device checks).
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def reset_parameters(self) -> None:
        # Same init as the paper / PEFT: A ~ Kaiming-uniform, B = 0, so the update starts at zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """s * B A, the update to W0, in float32."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        lora_in = self.dropout(x).to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(lora_in)) * self.scaling
        return out + update.to(out.dtype)

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear with W0 + s B A (in the base dtype) and the base bias."""
        base = self.base_layer
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        merged.weight.copy_((base.weight.float() + self.delta_weight()).to(base.weight.dtype))
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        return merged

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:.4g}, rslora={self.rslora}"
