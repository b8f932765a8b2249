"""The fused LoRA linear (:mod:`deftune.kernels.lora_linear`) against the plain ``LoRALinear`` math: values,
gradients, what it saves for backward, dtypes, grouped projections and the cached factor casts.

Runs the PyTorch path (the kernels' Triton parts have their own tests); the patched models that use these
Functions are tested in tests/fast_path.
"""

from __future__ import annotations

import copy

import pytest
import torch

from deftune.adapters.lora.layer import LoRALinear
from deftune.kernels import lora_linear as ll
from deftune.kernels.lora_linear import lora_group, lora_linear

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _reference_path_on_cpu(monkeypatch):
    """On CPU run the PyTorch references, not Triton's interpreter (which the test session turns on for
    the kernel tests)."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    yield


def _plain_lora_reference(x, base, a, b, scaling):
    """The plain LoRALinear's math: base(x) + s * B A x, A/B applied in float32."""
    return base(x) + (x.float() @ a.t() @ b.t() * scaling).to(x.dtype)


@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_matches_plain_layer_fp32(bias):
    torch.manual_seed(0)
    base = torch.nn.Linear(37, 23, bias=bias).requires_grad_(False)
    plain = LoRALinear(base, rank=5, alpha=7.0)
    torch.nn.init.normal_(plain.lora_B.weight)
    fused = copy.deepcopy(plain)
    fused.fused = True
    x = torch.randn(3, 11, 37)
    x_plain, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_plain, out_fused = plain(x_plain), fused(x_fused)
    torch.testing.assert_close(out_fused, out_plain, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(out_plain)
    out_plain.backward(dy)
    out_fused.backward(dy)
    torch.testing.assert_close(x_fused.grad, x_plain.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.lora_A.weight.grad, plain.lora_A.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.lora_B.weight.grad, plain.lora_B.weight.grad, atol=1e-5, rtol=1e-5)
    assert base.weight.grad is None


def test_lora_linear_saves_only_x_and_the_rank_space_product():
    """Saved for backward: x [.., in], u = x A^T [.., r], and the A, B parameters themselves; nothing of
    the output's width (no output, no dropout copy, no float32 copy of x)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(40, 24, bias=False).requires_grad_(False)
    layer = LoRALinear(base, rank=4, alpha=8.0)
    x = torch.randn(2, 7, 40, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora_linear(x, base, layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    activations = [t for t in saved if t is not layer.lora_A.weight and t is not layer.lora_B.weight]
    # u is kept flattened to rows [B*T, r].
    assert sorted(tuple(t.shape) for t in activations) == [(2, 7, 40), (14, 4)]
    assert any(t.data_ptr() == x.data_ptr() for t in activations)  # x itself, not a copy


def test_lora_linear_bf16_base_fp32_adapters_and_dequantize():
    """W0 in bf16 (computed in bf16), A/B float32 masters get float32 grads; a base exposing
    ``dequantize()`` (4-bit) is read through it."""
    class DequantizingBase(torch.nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.packed = weight.clone()
            self.bias = None
            self.compute_dtype = weight.dtype
            self.calls = 0

        def dequantize(self):
            self.calls += 1
            return self.packed

    torch.manual_seed(0)
    w0 = torch.randn(24, 40).to(torch.bfloat16)
    base = DequantizingBase(w0)
    a = (torch.randn(4, 40) * 0.1).requires_grad_()
    b = (torch.randn(24, 4) * 0.1).requires_grad_()
    x = torch.randn(5, 40, dtype=torch.bfloat16, requires_grad=True)
    out = lora_linear(x, base, a, b, 2.0)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert base.calls == 2  # forward and backward; no dequantized copy kept in between

    linear = torch.nn.Linear(40, 24, bias=False).requires_grad_(False)
    linear.weight.data = w0.float()
    xr, ar, br = (t.detach().float().requires_grad_() for t in (x, a, b))
    ref = _plain_lora_reference(xr, linear, ar, br, 2.0)
    ref.square().sum().backward()
    # bf16 keeps 8 mantissa bits and the upstream gradient (2 * out) is itself rounded, so single
    # elements can be off by several percent; the error relative to the whole tensor stays ~1e-2.
    for got, want in ((out, ref), (x.grad, xr.grad), (a.grad, ar.grad), (b.grad, br.grad)):
        assert float((got.detach().float() - want.detach()).norm() / want.norm()) < 2e-2


def test_lora_group_matches_separate_layers_with_mixed_ranks_bias_and_an_unused_output():
    """lora_group (projections sharing x: one rank GEMM, one dx buffer) == each plain LoRALinear on its
    own: outputs, dx, every dA/dB; ranks and scalings may differ; an output that reaches no loss gives
    zero dB."""
    torch.manual_seed(0)
    # Scalings 2, 1 (alpha = r: no multiply in the dB path) and 4/3.
    plain = [LoRALinear(torch.nn.Linear(24, out, bias=bias).requires_grad_(False), rank=r, alpha=alpha)
             for out, r, bias, alpha in ((16, 4, True, 8.0), (8, 2, False, 2.0), (8, 6, True, 8.0))]
    for p in plain:
        torch.nn.init.normal_(p.lora_B.weight)
    fused = copy.deepcopy(plain)
    for p in fused:
        p.fused = True
    x = torch.randn(2, 5, 24)
    xp, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    outs_p = [p(xp) for p in plain]
    outs_f = lora_group(xf, fused)
    for got, want in zip(outs_f, outs_p):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    dys = [torch.randn_like(o) for o in outs_p]
    sum((o * d).sum() for o, d in zip(outs_p[:2], dys)).backward()  # the third output is unused
    sum((o * d).sum() for o, d in zip(outs_f[:2], dys)).backward()
    torch.testing.assert_close(xf.grad, xp.grad, atol=1e-5, rtol=1e-5)
    for p, f in zip(plain, fused):
        for name in ("lora_A", "lora_B"):
            want = getattr(p, name).weight.grad
            got = getattr(f, name).weight.grad
            torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_lora_factor_casts_follow_every_update(fused):
    """The compute-dtype copies of A and s*B are cached between forward, recompute and backward; an
    optimizer step (fused or foreach AdamW), load_state_dict and a ``.data`` swap must all reach the next
    forward, and a backward releases the copies it used."""
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 16, bias=True).to(torch.bfloat16).requires_grad_(False)
    a = torch.nn.Parameter(0.1 * torch.randn(4, 24))
    b = torch.nn.Parameter(0.1 * torch.randn(16, 4))
    x = torch.randn(5, 24, dtype=torch.bfloat16)

    def want():
        with torch.no_grad():
            return base(x) + (x.float() @ a.t() @ b.t() * 2.0).to(torch.bfloat16)

    def _close(actual, expected):
        torch.testing.assert_close(actual.float(), expected.float(), atol=2e-2, rtol=2e-2)

    def got():
        with torch.no_grad():
            return ll.lora_linear(x, base, a, b, 2.0)

    _close(got(), want())
    assert a in ll._CASTS and b in ll._CASTS  # cached by the forward
    opt = torch.optim.AdamW([a, b], lr=0.05, fused=fused, foreach=None if fused else True)
    out = ll.lora_linear(x, base, a, b, 2.0)
    out.float().square().sum().backward()
    assert a not in ll._CASTS and b not in ll._CASTS  # released by the backward
    before = got().clone()
    opt.step()
    after = got()
    assert not torch.equal(after, before)
    _close(after, want())
    with torch.no_grad():
        b.copy_(torch.full_like(b, 0.01))  # in place: bumps the version counter
    _close(got(), want())
    b.data = torch.full_like(b, -0.02)  # a new storage behind the same parameter
    _close(got(), want())


def test_base_gemm_accumulates_into_the_adapter_term_in_place(monkeypatch):
    """The frozen GEMM adds x W0^T onto the adapter term's own buffer (no copy of it into a new output),
    and values and gradients still equal base(x) + s (x A^T) B^T."""
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 16, bias=True).requires_grad_(False)
    a = torch.nn.Parameter(0.1 * torch.randn(4, 24))
    b = torch.nn.Parameter(0.1 * torch.randn(16, 4))
    x = torch.randn(5, 24, requires_grad=True)
    seen = {}
    real = ll.LoRAGroupDeltaFunction.forward

    def spy(ctx, *args):
        (seen["low"],) = lows = real(ctx, *args)
        return lows

    monkeypatch.setattr(ll.LoRAGroupDeltaFunction, "forward", staticmethod(spy))
    y = ll.lora_linear(x, base, a, b, 2.0)
    assert y.data_ptr() == seen["low"].data_ptr()
    xr, ar, br = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    ref = base(xr) + (xr @ ar.t() @ br.t()) * 2.0
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    y.backward(g)
    ref.backward(g)
    for got, want in ((x.grad, xr.grad), (a.grad, ar.grad), (b.grad, br.grad)):
        torch.testing.assert_close(got, want)


def test_frozen_factors_get_no_gradient_and_the_others_the_right_one():
    """A factor that does not require grad (a frozen stage, or A kept fixed) gets none; dx and the other
    factor's gradient still match autograd's."""
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 16, bias=False).requires_grad_(False)
    a = 0.1 * torch.randn(4, 24)  # frozen
    b = torch.nn.Parameter(0.1 * torch.randn(16, 4))
    x = torch.randn(5, 24, requires_grad=True)
    y = lora_linear(x, base, a, b, 2.0)
    xr, br = x.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    ref = base(xr) + (xr @ a.t() @ br.t()) * 2.0
    g = torch.randn_like(ref)
    y.backward(g)
    ref.backward(g)
    assert a.grad is None
    torch.testing.assert_close(b.grad, br.grad)
    torch.testing.assert_close(x.grad, xr.grad)


def test_lora_factor_casts_work_for_inference_tensors():
    """Factors created under inference_mode have no version counter: they are cast every time, not cached."""
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 16, bias=False).to(torch.bfloat16).requires_grad_(False)
    with torch.inference_mode():
        a = 0.1 * torch.randn(4, 24)
        b = 0.1 * torch.randn(16, 4)
        x = torch.randn(5, 24, dtype=torch.bfloat16)
        y = ll.lora_linear(x, base, a, b, 2.0)
        want = base(x) + (x.float() @ a.t() @ b.t() * 2.0).to(torch.bfloat16)
    torch.testing.assert_close(y.float(), want.float(), atol=2e-2, rtol=2e-2)
    assert a not in ll._CASTS and b not in ll._CASTS
