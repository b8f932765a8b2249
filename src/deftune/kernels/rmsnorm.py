"""RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467) with Llama's numerics.

    y = w * (x / sqrt(mean(x^2) + eps))

computed in float32 and cast back to the input dtype *before* the weight multiply, exactly like
transformers' ``LlamaRMSNorm``: ``weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(input_dtype)``.
"""

from __future__ import annotations

import torch

from deftune.kernels import use_triton

__all__ = ["rms_norm", "rms_norm_reference"]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Pure-PyTorch RMSNorm over the last dim: ``w * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype)``."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(input_dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, ``w * x / sqrt(mean(x^2) + eps)`` (Llama numerics, see module doc).

    Runs the fused Triton kernel on CUDA (or under ``TRITON_INTERPRET=1``), else the reference.
    The backward always gives ``dx``; ``dw`` only when ``weight.requires_grad``.
    """
    if use_triton(x, weight):
        # the Triton module imports triton (optional extra `kernels`)
        from deftune.kernels._rmsnorm_triton import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
