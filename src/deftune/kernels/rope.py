"""Rotary position embedding, RoPE (Su et al. 2021, arXiv:2104.09864), applied to Q and K at once.

Hugging Face layout and convention: ``q`` [B, Hq, T, D], ``k`` [B, Hk, T, D] (``Hq != Hk`` under GQA),
``cos``/``sin`` [B, T, D] as returned by ``LlamaRotaryEmbedding`` (the D/2 frequencies repeated twice),

    out = x * cos + rotate_half(x) * sin,    rotate_half(x) = cat(-x2, x1)

with ``x1, x2`` the first and second halves of the head dim. The map is a rotation, so its
backward is the same formula with ``-sin``.
"""

from __future__ import annotations

import torch

from deftune.kernels import use_triton

__all__ = ["rope_qk", "rope_qk_reference", "rotate_half"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` over the last dim, ``x1, x2`` its two halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_qk_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch RoPE, as HF's ``apply_rotary_pos_emb``: ``x * cos + rotate_half(x) * sin``."""
    cos = cos.unsqueeze(1)  # [B, 1, T, D]: broadcast over heads
    sin = sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rope_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on ``q`` [B, Hq, T, D] and ``k`` [B, Hk, T, D] with ``cos``/``sin`` [B, T, D] (module doc).

    One fused Triton launch covers Q and K on CUDA (or under ``TRITON_INTERPRET=1``), else the reference.
    Returns ``(q_out, k_out)`` in the dtypes and shapes of ``q`` and ``k``.
    """
    if use_triton(q, k, cos, sin):
        # the Triton module imports triton (optional extra `kernels`)
        from deftune.kernels._rope_triton import rope_qk_triton

        return rope_qk_triton(q, k, cos, sin)
    return rope_qk_reference(q, k, cos, sin)
