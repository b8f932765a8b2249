"""Triton RoPE kernel for Q and K together, and its ``autograd.Function`` (fast layer of :mod:`.rope`).

Kept apart from :mod:`.rope` so triton is imported (and ``TRITON_INTERPRET`` read) only on first use.

With halves x = (x1, x2), c = (c1, c2), s = (s1, s2) of the head dim:
forward   y1 = x1 c1 - x2 s1,   y2 = x2 c2 + x1 s2          (= x cos + rotate_half(x) sin)
backward  dx1 = dy1 c1 + dy2 s2,   dx2 = dy2 c2 - dy1 s1     (the transpose; with HF's c1 = c2,
                                                            s1 = s2 it is the rotation by -sin)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_heads(
    X, Y, c1, c2, s1, s2, b, t, n_heads,
    sxb, sxh, sxt, syb, syh, syt,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr,
):  # fmt: skip
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (d < HALF)
    x_ptr = X + b * sxb + t * sxt + heads * sxh + d
    y_ptr = Y + b * syb + t * syt + heads * syh + d
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(y_ptr, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + HALF, y2.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_qk_kernel(
    Q, K, QO, KO, COS, SIN, T, n_q_heads, n_k_heads,
    sqb, sqh, sqt, skb, skh, skt,
    sqob, sqoh, sqot, skob, skoh, skot,
    scb, sct,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BACKWARD: tl.constexpr,
):  # fmt: skip
    # One program per (batch, position): cos/sin are loaded once and reused by every Q and K head.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < HALF
    cs = COS + b * scb + t * sct + d
    sn = SIN + b * scb + t * sct + d
    c1 = tl.load(cs, mask=dmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cs + HALF, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sn, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sn + HALF, mask=dmask, other=0.0).to(tl.float32)[None, :]
    _rope_heads(Q, QO, c1, c2, s1, s2, b, t, n_q_heads, sqb, sqh, sqt, sqob, sqoh, sqot,
                HALF, BLOCK_HQ, BLOCK_HALF, BACKWARD)  # fmt: skip
    _rope_heads(K, KO, c1, c2, s1, s2, b, t, n_k_heads, skb, skh, skt, skob, skoh, skot,
                HALF, BLOCK_HK, BLOCK_HALF, BACKWARD)  # fmt: skip


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(q, k, cos, sin, q_out, k_out, backward: bool) -> None:
    batch, n_q_heads, seq, head_dim = q.shape
    n_k_heads = k.shape[1]
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_hq = triton.next_power_of_2(n_q_heads)
    block_hk = triton.next_power_of_2(n_k_heads)
    num_warps = 4 if (block_hq + block_hk) * block_half <= 4096 else 8
    if batch * seq == 0:
        return
    _rope_qk_kernel[(batch * seq,)](
        q, k, q_out, k_out, cos, sin, seq, n_q_heads, n_k_heads,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0), cos.stride(1),
        HALF=half, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half, BACKWARD=backward,
        num_warps=num_warps,
    )  # fmt: skip


class RoPEQKFunction(torch.autograd.Function):
    """Rotates Q and K in one launch; strided inputs (HF's ``view(...).transpose(1, 2)``) need no copy."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        batch, _, seq, head_dim = q.shape
        if head_dim % 2 or k.shape[-1] != head_dim or cos.shape[-1] != head_dim:
            raise ValueError(f"rope_qk: head dims must match and be even, got q {q.shape}, k {k.shape}, "
                             f"cos {cos.shape}")  # fmt: skip
        q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
        # cos/sin [1, T, D] (one set of positions for the whole batch) broadcast with stride 0, like the
        # reference; both must share strides since the kernel indexes them with one pair.
        cos = _last_dim_contiguous(cos).expand(batch, seq, head_dim)
        sin = _last_dim_contiguous(sin).expand(batch, seq, head_dim)
        if cos.stride() != sin.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
        q_out = torch.empty_like(q, dtype=torch.result_type(q, cos))  # empty_like keeps q's strides
        k_out = torch.empty_like(k, dtype=torch.result_type(k, cos))
        _launch(q, k, cos, sin, q_out, k_out, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        dq_out, dk_out = _last_dim_contiguous(dq_out), _last_dim_contiguous(dk_out)
        dq = torch.empty_like(dq_out, dtype=ctx.dtypes[0])
        dk = torch.empty_like(dk_out, dtype=ctx.dtypes[1])
        _launch(dq_out, dk_out, cos, sin, dq, dk, backward=True)
        return dq, dk, None, None


def rope_qk_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Triton RoPE on Q and K (see :func:`deftune.kernels.rope.rope_qk`); no gradient for cos/sin."""
    return RoPEQKFunction.apply(q, k, cos, sin)
