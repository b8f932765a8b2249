"""SwiGLU Triton kernel vs the PyTorch reference: output, dgate and dup."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, DTYPES, assert_close, gpu_only, leaf, seeded_triton_path  # noqa: F401

from deftune.kernels.swiglu import swiglu, swiglu_reference


def _compare(shape, dtype):
    gate = (4 * torch.randn(shape, device=DEVICE)).to(dtype)  # wide range: both tails of the sigmoid
    up = torch.randn(shape, device=DEVICE).to(dtype)
    dh = torch.randn(shape, device=DEVICE).to(dtype)
    ga, ua, gb, ub = leaf(gate), leaf(up), leaf(gate), leaf(up)
    ha, hb = swiglu(ga, ua), swiglu_reference(gb, ub)
    assert ha.dtype == hb.dtype
    assert_close(ha, hb, dtype)
    ha.backward(dh)
    hb.backward(dh)
    assert_close(ga.grad, gb.grad, dtype)
    assert_close(ua.grad, ub.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 13, 37), (1, 1), (3, 1031)])  # 3093 elements: a partial last block
def test_swiglu_matches_reference(shape, dtype):
    _compare(shape, dtype)


def test_swiglu_extreme_gates_stay_finite():
    gate = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4], device=DEVICE, requires_grad=True)
    up = torch.ones_like(gate, requires_grad=True)
    out = swiglu(gate, up)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(gate.grad).all() and torch.isfinite(up.grad).all()
    assert_close(out, swiglu_reference(gate.detach(), up.detach()), torch.float32)


def test_swiglu_non_contiguous_inputs():
    gate = torch.randn(37, 13, device=DEVICE).t()
    up = torch.randn(37, 13, device=DEVICE).t()
    assert_close(swiglu(gate, up), swiglu_reference(gate, up), torch.float32)


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_real_shape_gpu(dtype):
    _compare((8192, 14336), dtype)  # Llama-3-8B MLP width


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_inplace_backward_same_gradients_written_over_the_inputs(dtype):
    """inplace_backward: gradients equal the reference's and land in gate's and up's own storage."""
    g0 = leaf((4 * torch.randn(3, 1031, device=DEVICE)).to(dtype))
    u0 = leaf(torch.randn(3, 1031, device=DEVICE).to(dtype))
    dh = torch.randn(3, 1031, device=DEVICE).to(dtype)
    gate, up = g0 * 1, u0 * 1  # non-leaf inputs, as the MLP's projections produce
    out = swiglu(gate, up, inplace_backward=True)
    gr, ur = leaf(g0.detach()), leaf(u0.detach())
    ref = swiglu_reference(gr, ur)
    assert_close(out, ref, dtype)
    out.backward(dh)
    ref.backward(dh)
    assert_close(g0.grad, gr.grad, dtype)
    assert_close(u0.grad, ur.grad, dtype)
    assert torch.equal(gate.detach(), g0.grad) and torch.equal(up.detach(), u0.grad)


@pytest.mark.parametrize("block_bytes", [None, 7 * 40 * 4])  # one block; blocks of 7 rows (and a partial one)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_into_lora_down_projection_matches_reference(dtype, block_bytes, monkeypatch):
    """swiglu_lora_linear (the patched MLP's SwiGLU + LoRA down projection, h rebuilt in backward, gradients
    written over gate/up) equals down(silu(g) * u) + s (h A^T) B^T step by step through autograd."""
    from deftune.kernels import lora_linear
    from deftune.kernels.lora_linear import swiglu_lora_linear

    if block_bytes:
        monkeypatch.setattr(lora_linear, "_BACKWARD_BLOCK_BYTES", block_bytes)
    torch.manual_seed(0)
    base = torch.nn.Linear(40, 24, bias=False).to(DEVICE, dtype).requires_grad_(False)
    a = leaf(0.1 * torch.randn(4, 40, device=DEVICE))
    b = leaf(0.1 * torch.randn(24, 4, device=DEVICE))
    g0 = leaf((3 * torch.randn(2, 9, 40, device=DEVICE)).to(dtype))
    u0 = leaf(torch.randn(2, 9, 40, device=DEVICE).to(dtype))
    dy = torch.randn(2, 9, 24, device=DEVICE).to(dtype)
    out = swiglu_lora_linear(g0 * 1, u0 * 1, base, a, b, 2.0)
    gr, ur, ar, br = (leaf(t.detach()) for t in (g0, u0, a, b))
    h = swiglu_reference(gr, ur)
    ref = base(h) + ((h.float() @ ar.t() @ br.t()) * 2.0).to(dtype)
    assert_close(out, ref, dtype)
    out.backward(dy)
    ref.backward(dy)
    for got, want in ((g0.grad, gr.grad), (u0.grad, ur.grad), (a.grad, ar.grad), (b.grad, br.grad)):
        assert_close(got, want, dtype)


@gpu_only
def test_swiglu_into_lora_down_projection_real_shape_gpu():
    """Llama-3-8B MLP width, 4096 tokens (two 64 MiB row blocks in backward), bf16."""
    from deftune.kernels.lora_linear import swiglu_lora_linear

    torch.manual_seed(0)
    base = torch.nn.Linear(14336, 4096, bias=False).to(DEVICE, torch.bfloat16).requires_grad_(False)
    a = leaf(0.01 * torch.randn(16, 14336, device=DEVICE))
    b = leaf(0.01 * torch.randn(4096, 16, device=DEVICE))
    g0 = leaf((3 * torch.randn(4096, 14336, device=DEVICE)).to(torch.bfloat16))
    u0 = leaf(torch.randn(4096, 14336, device=DEVICE).to(torch.bfloat16))
    dy = torch.randn(4096, 4096, device=DEVICE).to(torch.bfloat16)
    out = swiglu_lora_linear(g0 * 1, u0 * 1, base, a, b, 2.0)
    gr, ur, ar, br = (leaf(t.detach()) for t in (g0, u0, a, b))
    h = swiglu_reference(gr, ur)
    ref = base(h) + ((h.float() @ ar.t() @ br.t()) * 2.0).to(torch.bfloat16)
    out.backward(dy)
    ref.backward(dy)
    for got, want in ((out, ref), (g0.grad, gr.grad), (u0.grad, ur.grad), (a.grad, ar.grad), (b.grad, br.grad)):
        rel = float((got.float() - want.float()).norm() / want.float().norm())
        assert rel < 2e-2, rel


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_backward_with_values_writes_gradients_and_h_in_place(dtype):
    """The MLP backward's one pass: dg over gate, du over up, h = silu(g) u over dh -- equal to the
    reference gradients and product, in the three inputs' own storage."""
    from deftune.kernels.swiglu import swiglu_backward_with_values_

    g0 = (4 * torch.randn(3, 1031, device=DEVICE)).to(dtype)  # a partial last Triton block
    u0 = torch.randn(3, 1031, device=DEVICE).to(dtype)
    dh0 = torch.randn(3, 1031, device=DEVICE).to(dtype)
    gr, ur = leaf(g0), leaf(u0)
    ref = swiglu_reference(gr, ur)
    ref.backward(dh0)
    gate, up, dh = g0.clone(), u0.clone(), dh0.clone()
    ptrs = (gate.data_ptr(), up.data_ptr(), dh.data_ptr())
    h = swiglu_backward_with_values_(dh, gate, up)
    assert (gate.data_ptr(), up.data_ptr(), h.data_ptr()) == ptrs
    assert_close(gate, gr.grad, dtype)
    assert_close(up, ur.grad, dtype)
    assert_close(h, ref, dtype)
