"""Chunked linear + cross-entropy (Triton CE kernel) vs ``F.cross_entropy(F.linear(...))``: loss,
dhidden, dweight of a trainable head, and no weight-gradient buffer at all for a frozen head."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, DTYPES, assert_close, gpu_only, leaf, seeded_triton_path  # noqa: F401
from torch.utils._python_dispatch import TorchDispatchMode

from deftune.kernels.linear_ce import linear_cross_entropy, linear_cross_entropy_reference

N, H, V, CHUNK = 45, 37, 257, 16  # 45 rows = 2 full chunks + 13; V=257 crosses the kernel's 128-wide blocks


def _problem(dtype, n=N, hidden=H, vocab=V):
    h = torch.randn(n, hidden, device=DEVICE).to(dtype)
    w = (torch.randn(vocab, hidden, device=DEVICE) / hidden**0.5 * 3).to(dtype)
    y = torch.randint(0, vocab, (n,), device=DEVICE)
    y[::5] = -100
    y[:CHUNK] = -100  # a whole chunk of ignored rows
    return h, w, y


def _compare(dtype, reduction, softcap, train_head, chunk_size=CHUNK, scale=1.0, problem=None):
    h, w, y = problem or _problem(dtype)
    ha, wa, hb, wb = leaf(h), leaf(w, train_head), leaf(h), leaf(w, train_head)
    loss = linear_cross_entropy(ha, wa, y, reduction=reduction, softcap=softcap, chunk_size=chunk_size)
    ref = linear_cross_entropy_reference(hb, wb, y, reduction=reduction, softcap=softcap)
    assert loss.dtype == ref.dtype == torch.float32
    assert_close(loss, ref, torch.float32 if dtype == torch.float32 else dtype, scale)
    (0.5 * loss).backward()  # a grad_output other than 1 checks the backward's scaling
    (0.5 * ref).backward()
    assert_close(ha.grad, hb.grad, dtype, scale)
    if train_head:
        assert_close(wa.grad, wb.grad, dtype, scale)
    else:
        assert wa.grad is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("train_head", [False, True])
def test_linear_cross_entropy_matches_reference(dtype, reduction, softcap, train_head):
    _compare(dtype, reduction, softcap, train_head)


def test_linear_cross_entropy_default_chunk_size():
    _compare(torch.float32, "mean", None, train_head=True, chunk_size=None)


def test_linear_cross_entropy_no_grad_gives_the_loss():
    h, w, y = _problem(torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y, chunk_size=CHUNK)
    assert_close(loss, linear_cross_entropy_reference(h, w, y), torch.float32)


class _AllocationRecorder(TorchDispatchMode):
    """Records the bytes of every tensor an op returns that does not share an input's storage (bytes: the
    Triton interpreter moves tensors as uint8 copies)."""

    def __init__(self, *inputs: torch.Tensor):
        super().__init__()
        self.input_storages = {t.untyped_storage().data_ptr() for t in inputs}
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.input_storages:
                self.sizes.append(t.numel() * t.element_size())
        return out


def test_linear_cross_entropy_frozen_head_allocates_no_weight_grad():
    h, w, y = _problem(torch.float32)
    h.requires_grad_()
    with _AllocationRecorder(h, w, y) as recorder:
        loss = linear_cross_entropy(h, w, y, chunk_size=CHUNK)
        loss.backward()
    assert w.grad is None
    assert h.grad is not None
    # The largest buffers are a chunk of logits (16 x 257) and grad_hidden (45 x 37), far below V x H.
    assert max(recorder.sizes) < V * H * 4
    assert max(recorder.sizes) <= CHUNK * V * 4


@gpu_only
@pytest.mark.parametrize("train_head", [False, True])
def test_linear_cross_entropy_real_shape_gpu(train_head):
    # Llama-3 vocabulary; the bf16 reference rounds 8192-row sums in one matmul where the fused path
    # accumulates chunk by chunk, hence x2 on the bf16 tolerance.
    problem = _problem(torch.bfloat16, n=8192, hidden=2048, vocab=128256)
    _compare(torch.bfloat16, "mean", None, train_head, chunk_size=None, scale=2.0, problem=problem)


@gpu_only
def test_linear_cross_entropy_peak_memory_below_full_logits_gpu():
    h, w, y = _problem(torch.bfloat16, n=8192, hidden=2048, vocab=128256)
    h.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    linear_cross_entropy(h, w, y).backward()
    full_logits_fp32 = 8192 * 128256 * 4
    assert torch.cuda.max_memory_allocated() - base < full_logits_fp32 / 4
