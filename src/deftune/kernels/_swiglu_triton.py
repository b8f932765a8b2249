"""Triton SwiGLU kernels and their ``autograd.Function`` (the fast layer of :mod:`.swiglu`).

Kept apart from :mod:`.swiglu` so triton is imported (and ``TRITON_INTERPRET`` read) only on first use.

forward   h = g * s * u,  s = sigmoid(g)
backward  dg = dh * u * s * (1 + g * (1 - s)),   du = dh * g * s
Only g and u are saved; s is recomputed in the backward (one exp per element is cheaper than a tensor).
With ``inplace_backward`` dg and du overwrite g and u (each element is read before it is written, by the
same program): the MLP's two largest backward buffers are then never allocated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _sigmoid(x):
    # exp of -|x| never overflows; mirror it for x < 0.
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _swiglu_fwd(G, U, H, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(H + offs, (g * _sigmoid(g) * u).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DH, G, U, DG, DU, H, n, BLOCK: tl.constexpr, WRITE_H: tl.constexpr):
    # dg -> DG, du -> DU and (WRITE_H) h -> H; any of them may alias DH, G or U: every element is loaded
    # before any store to the same offsets.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = _sigmoid(g)
    tl.store(DG + offs, (dh * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dh * g * s).to(DU.dtype.element_ty), mask=mask)
    if WRITE_H:
        tl.store(H + offs, (g * s * u).to(H.dtype.element_ty), mask=mask)


def swiglu_bwd_values_(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """dgate, dup written over gate, up and h = silu(gate) * up over dh (contiguous, same shape);
    returns dh."""
    n = gate.numel()
    if n:
        _swiglu_bwd[(triton.cdiv(n, _BLOCK),)](dh, gate, up, gate, up, dh, n, BLOCK=_BLOCK, WRITE_H=True)
    return dh


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """h = silu(gate) * up for contiguous same-shape tensors (no autograd)."""
    h = torch.empty(gate.shape, dtype=torch.result_type(gate, up), device=gate.device)
    n = gate.numel()
    if n:
        _swiglu_fwd[(triton.cdiv(n, _BLOCK),)](gate, up, h, n, BLOCK=_BLOCK)
    return h


def swiglu_bwd_(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) written over (gate, up) (no autograd; contiguous same-shape tensors)."""
    n = gate.numel()
    if n:
        dh = dh.contiguous()
        _swiglu_bwd[(triton.cdiv(n, _BLOCK),)](dh, gate, up, gate, up, dh, n, BLOCK=_BLOCK, WRITE_H=False)
    return gate, up


class SwiGLUFunction(torch.autograd.Function):
    """Fused ``silu(gate) * up``: the silu output is never stored; backward recomputes it."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, inplace_backward: bool = False) -> torch.Tensor:
        if gate.shape != up.shape:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must match")
        gate, up = gate.contiguous(), up.contiguous()
        h = torch.empty(gate.shape, dtype=torch.result_type(gate, up), device=gate.device)
        n = gate.numel()
        if n:
            _swiglu_fwd[(triton.cdiv(n, _BLOCK),)](gate, up, h, n, BLOCK=_BLOCK)
        ctx.save_for_backward(gate, up)
        ctx.inplace_backward = inplace_backward
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gate, up = ctx.saved_tensors
        dh = dh.contiguous()
        if ctx.inplace_backward:
            dg, du = gate, up
        else:
            dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n:
            _swiglu_bwd[(triton.cdiv(n, _BLOCK),)](dh, gate, up, dg, du, dh, n, BLOCK=_BLOCK, WRITE_H=False)
        return dg, du, None


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor, inplace_backward: bool = False) -> torch.Tensor:
    """Triton ``silu(gate) * up`` (see :func:`deftune.kernels.swiglu.swiglu`)."""
    return SwiGLUFunction.apply(gate, up, inplace_backward)
