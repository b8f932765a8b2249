"""LoRA linear layer as one autograd.Function whose backward works in rank space.

LoRA (Hu et al. 2021, arXiv:2106.09685) with a frozen base W0 [out, in], A [r, in], B [out, r]:

    y = x W0^T + b + s * (x A^T) B^T

Autograd of the plain module keeps x, x A^T *and* a float32 copy of x for the adapter branch (plus any
dropout output). This Function saves only x and the small u = x A^T [.., r], and derives every gradient
from them, never forming an [out, in] matrix:

    dU = s * dy B                [.., r]
    dB = s * dy^T u              [out, r]
    dA = dU^T x                  [r, in]
    dx = dy W0 + dU A            [.., in]

Everything is computed in W0's dtype (bf16 on a GPU), and dA, dB are returned in A's and B's dtype
(float32 master weights). A base that stores its weight quantized exposes ``dequantize()`` (4-bit NF4):
W0 is dequantized in forward and again in backward, so the full-precision copy is never kept alive.
Only valid without LoRA dropout (dropout would need its mask saved); the patch leaves such modules alone.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["lora_linear", "base_weight"]


def base_weight(base: nn.Module) -> torch.Tensor:
    """W0 [out, in] of a frozen base layer: ``dequantize()`` when it stores a quantized weight."""
    if hasattr(base, "dequantize"):
        return base.dequantize()
    return base.weight


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base, scaling):
        w0 = base_weight(base)
        dtype = w0.dtype
        xc = x.to(dtype)
        x2 = xc.reshape(-1, xc.shape[-1])
        u = x2 @ lora_a.to(dtype).t()
        # s folded into the [out, r] factor, and the adapter's term added in the base GEMM's epilogue
        # (addmm's C input): no extra full-size passes over y for the scaling and the sum.
        low = u @ (lora_b * scaling).to(dtype).t()
        if base.bias is not None:
            low = low + base.bias.to(dtype)
        y = torch.addmm(low, x2, w0.t())
        ctx.base = base
        ctx.scaling = scaling
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(xc, u, lora_a, lora_b)
        return y.reshape(*xc.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        xc, u, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        dtype = xc.dtype
        dy = dy.to(dtype)
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = xc.reshape(-1, xc.shape[-1])
        du = dy2 @ (lora_b * s).to(dtype)
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            # dU A first (rank-r GEMM), then dy W0 accumulated onto it in the big GEMM's epilogue.
            dx = torch.addmm(du @ lora_a.to(dtype), dy2, base_weight(ctx.base).to(dtype))
            dx = dx.reshape(xc.shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            da = (du.t() @ x2).to(lora_a.dtype)
        if ctx.needs_input_grad[2]:
            db = ((dy2.t() @ u) * s).to(lora_b.dtype)
        return dx, da, db, None, None


def lora_linear(x: torch.Tensor, base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float) -> torch.Tensor:
    """``x W0^T + b + s (x A^T) B^T`` with the rank-space backward above; ``base`` is frozen (its
    weight and bias get no gradient)."""
    return LoRALinearFunction.apply(x, lora_a, lora_b, base, scaling)
