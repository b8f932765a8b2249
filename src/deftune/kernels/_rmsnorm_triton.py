"""Triton RMSNorm kernels and their ``autograd.Function`` (the fast layer of :mod:`.rmsnorm`).

Kept apart from :mod:`.rmsnorm` because defining ``@triton.jit`` functions imports triton, and triton
reads ``TRITON_INTERPRET`` when a kernel is defined: both must wait until an op is actually called.

Forward, per row x (length D), all in float32:  r = rsqrt(mean(x^2) + eps),  n = (x * r).to(x.dtype),
y = w * n. Backward with g = dy * w:  dx = r * (g - n * mean(g * n)),  dw = sum_rows(dy * n).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 at 8192 x 4096 x many
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    # Llama rounds the normalised row to the input dtype *before* the weight multiply; do the same.
    n = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * n).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd(
    DY, X, W, RSTD, DX, DW_PARTIAL,
    stride_dy, stride_x, stride_dx, n_rows, n_cols,
    HAS_DW: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # Each program walks rows pid, pid + G, ... so dw needs only G partial rows, summed in torch after.
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for row in range(pid, n_rows, n_programs):
        row64 = tl.cast(row, tl.int64)  # tl.cast, not .to: the interpreter hands range() plain ints
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row64)
        x_hat = x * rstd
        g = dy * w
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / n_cols))
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DW:  # frozen norm: no reduction at all
            dw_acc += dy * x_hat.to(X.dtype.element_ty).to(tl.float32)
    if HAS_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=mask)


def _launch_config(n_cols: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n_cols)
    num_warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    return block, num_warps


def _num_bwd_programs(x: torch.Tensor, n_rows: int) -> int:
    if x.is_cuda:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        return max(1, min(n_rows, 4 * sms))
    return max(1, min(n_rows, 4))  # interpreter: few programs, each walking several rows


class RMSNormFunction(torch.autograd.Function):
    """Fused RMSNorm: one read of x and one write of y forward; one pass for dx (and dw) backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        n_cols = shape[-1]
        x2 = x.reshape(-1, n_cols)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        out_dtype = torch.result_type(x, weight)  # as `weight * h.to(input_dtype)` promotes
        y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
        n_rows = x2.shape[0]
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block, num_warps = _launch_config(n_cols)
        if n_rows:
            _rms_norm_fwd[(n_rows,)](
                x2, weight, y, rstd, x2.stride(0), y.stride(0), n_cols, eps, BLOCK=block, num_warps=num_warps
            )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        has_dw = ctx.needs_input_grad[1]
        n_programs = _num_bwd_programs(x2, n_rows)
        dw_partial = (
            torch.empty((n_programs, n_cols), dtype=torch.float32, device=x2.device) if has_dw else rstd
        )  # rstd is only a placeholder pointer when there is no dw
        block, num_warps = _launch_config(n_cols)
        if n_rows:
            _rms_norm_bwd[(n_programs,)](
                dy2, x2, weight, rstd, dx, dw_partial,
                dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols,
                HAS_DW=has_dw, BLOCK=block, num_warps=num_warps,
            )  # fmt: skip
        dw = None
        if has_dw:
            dw = dw_partial.sum(0).to(weight.dtype) if n_rows else torch.zeros_like(weight)
        return dx.view(ctx.shape), dw, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm over the last dim (see :func:`deftune.kernels.rmsnorm.rms_norm`)."""
    return RMSNormFunction.apply(x, weight, eps)
