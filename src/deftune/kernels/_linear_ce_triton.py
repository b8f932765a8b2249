"""Chunked LM head + cross-entropy: the Triton softmax/CE kernel and the ``autograd.Function`` (the fast
layer of :mod:`.linear_ce`, where the method and its source are described).

Kept apart from :mod:`.linear_ce` so triton is imported (and ``TRITON_INTERPRET`` read) only on first use.

Per row with logits z (after the optional cap z = c tanh(z_raw / c)), target y, ``scale`` = 1 (sum) or
1 / #valid rows (mean):
    loss = logsumexp(z) - z_y
    dloss/dz_raw = scale * (softmax(z) - onehot(y)) * (1 - tanh(z_raw / c)^2)   (last factor only with a cap)
The kernel writes that gradient over the logits in place; ignored rows (y = -100) get loss 0, gradient 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

IGNORE_INDEX = -100
_IGNORE_INDEX = tl.constexpr(IGNORE_INDEX)  # compiled kernels may read only constexpr globals
# Default budget for one chunk's logits. The loss is where a LoRA step's memory peaks (every layer kept
# for backward is alive), so the chunk adds straight to the peak: 128 MiB is 523 rows of a 128k
# vocabulary in bf16, still a GEMM large enough to fill a datacenter GPU.
_CHUNK_BYTES = 128 * 2**20


@triton.jit
def _tanh(x):
    # From exp(-2|x|) <= 1: never overflows (tl.math's tanh is missing from the interpreter).
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _cross_entropy_rows(
    LOGITS, stride_row, TARGETS, LOSS, SCALE, n_cols, softcap,
    HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    z_row = LOGITS + row * stride_row
    target = tl.load(TARGETS + row)
    valid = target != _IGNORE_INDEX
    safe_target = tl.where(valid, target, 0)  # ignored rows still run, on a harmless index

    # Pass 1: online max and sum of exp over the vocabulary, one block at a time, in float32.
    m = float("-inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z = tl.where(mask, z, float("-inf"))  # after the cap, which would turn -inf into -softcap
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)

    z_target = tl.load(z_row + safe_target).to(tl.float32)
    if HAS_SOFTCAP:
        z_target = softcap * _tanh(z_target / softcap)
    tl.store(LOSS + row, tl.where(valid, lse - z_target, 0.0))

    # Pass 2: overwrite the logits with the gradient of the (scaled) loss.
    if WRITE_GRAD:
        scale = tl.load(SCALE)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(z / softcap)
                grad = tl.exp(softcap * t - lse) - tl.where(cols == safe_target, 1.0, 0.0)
                grad = grad * (1.0 - t * t)
            else:
                grad = tl.exp(z - lse) - tl.where(cols == safe_target, 1.0, 0.0)
            grad = tl.where(valid, grad * scale, 0.0)
            tl.store(z_row + cols, grad.to(LOGITS.dtype.element_ty), mask=mask)


def _cross_entropy_chunk(logits, targets, losses, scale, softcap, write_grad: bool) -> None:
    """Loss per row into ``losses``; with ``write_grad`` the logits become dloss/dlogits in place."""
    n_rows, n_cols = logits.shape
    # On a GPU wide blocks keep the two passes over a row memory-bound; the interpreter's cost is per
    # block, and small blocks there make the tests cross block boundaries.
    block = min(triton.next_power_of_2(n_cols), 4096 if logits.is_cuda else 128)
    _cross_entropy_rows[(n_rows,)](
        logits, logits.stride(0), targets, losses, scale, n_cols,
        1.0 if softcap is None else float(softcap),
        HAS_SOFTCAP=softcap is not None, WRITE_GRAD=write_grad, BLOCK=block, num_warps=8,
    )  # fmt: skip


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Loss and both gradients in the forward pass, chunk by chunk; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, reduction, softcap, chunk_size, grad_hidden_needed,
                grad_weight_needed):  # fmt: skip
        n_rows, n_hidden = hidden.shape
        vocab = weight.shape[0]
        valid = targets != IGNORE_INDEX
        # "mean" divides by the number of valid rows; as a tensor, so no host sync (0 rows: nan, as torch)
        if reduction == "mean":
            scale = 1.0 / valid.sum().to(torch.float32)
        else:
            scale = torch.ones((), dtype=torch.float32, device=hidden.device)
        if chunk_size is None:
            row_bytes = vocab * torch.empty((), dtype=hidden.dtype).element_size()
            chunk_size = max(1, _CHUNK_BYTES // row_bytes)
        chunk_size = max(1, min(chunk_size, n_rows))

        losses = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if grad_hidden_needed else None
        # Frozen head (LoRA): no [V, H] buffer at all. A trainable one accumulates in the weight's dtype,
        # in place, so no [V, H] temporary per chunk (bf16 sums per chunk: within bf16 tolerance).
        grad_weight = torch.zeros_like(weight) if grad_weight_needed else None
        write_grad = grad_hidden_needed or grad_weight_needed
        for start in range(0, n_rows, chunk_size):
            end = min(start + chunk_size, n_rows)
            h = hidden[start:end]
            logits = h @ weight.t()  # [chunk, V], in the input dtype as F.linear gives it
            _cross_entropy_chunk(logits, targets[start:end], losses[start:end], scale, softcap, write_grad)
            if grad_hidden is not None:
                torch.mm(logits, weight, out=grad_hidden[start:end])
            if grad_weight is not None:
                grad_weight.addmm_(logits.t(), h)
            del logits  # free the chunk before the next matmul allocates one
        ctx.has_grads = (grad_hidden is not None, grad_weight is not None)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
        return losses.sum() * scale

    @staticmethod
    def backward(ctx, grad_output):
        # Out of place, so a second backward (retain_graph) sees the stored gradients unchanged.
        saved = iter(ctx.saved_tensors)
        grad_hidden, grad_weight = (
            (lambda g: g * grad_output.to(g.dtype))(next(saved)) if has else None for has in ctx.has_grads
        )
        return grad_hidden, grad_weight, None, None, None, None, None, None


def linear_cross_entropy_triton(hidden, weight, targets, reduction, softcap, chunk_size) -> torch.Tensor:
    """Fused chunked linear + cross-entropy (see :func:`deftune.kernels.linear_ce.linear_cross_entropy`)."""
    shape = hidden.shape
    hidden2 = hidden.reshape(-1, shape[-1]).contiguous()
    targets2 = targets.reshape(-1).contiguous()
    if targets2.shape[0] != hidden2.shape[0]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match hidden {tuple(shape)}")
    grad_on = torch.is_grad_enabled()
    return LinearCrossEntropyFunction.apply(
        hidden2, weight.contiguous(), targets2, reduction, softcap, chunk_size,
        grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
    )  # fmt: skip
