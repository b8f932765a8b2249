"""Helpers shared by the kernel tests (kept out of conftest.py, whose module name is taken)."""

from __future__ import annotations

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (atol, rtol) by dtype. bf16 keeps 8 significant bits (one ulp is 2**-7 relative) and the two sides round
# to bf16 at different points (fp32 inside a kernel, after every op in the reference), so a bf16 element
# can be off by an ulp or two of the tensor's *largest* values where a reduction (dw, a row's mean) ends
# near zero: bf16's atol is relative to the expected tensor's max magnitude.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}
DTYPES = [torch.float32, torch.bfloat16]

_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_only(test):
    """Mark ``test`` for the ``gpu`` tier (real shapes, too slow for the CPU interpreter)."""
    return pytest.mark.gpu(_needs_cuda(test))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """``actual`` == ``expected`` within ``dtype``'s tolerance; ``scale`` loosens it (say why at the call)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    atol, rtol = TOLERANCES[dtype]
    if dtype != torch.float32:
        atol *= max(1.0, float(expected.detach().float().abs().max()))
    torch.testing.assert_close(actual.detach().float(), expected.detach().float(), atol=atol * scale, rtol=rtol * scale)


def leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    """A detached copy of ``t`` as a fresh leaf (one per side of a comparison)."""
    return t.detach().clone().requires_grad_(requires_grad)


@pytest.fixture(autouse=True)
def seeded_triton_path():
    """Seed, and guard against silently testing the reference against itself (autouse in every module
    that imports it)."""
    pytest.importorskip("triton", reason="kernel tests need triton (extra: deftune[kernels])")
    from deftune.kernels import use_triton

    assert use_triton(torch.empty(1, device=DEVICE)), "kernel tests must dispatch to Triton"
    torch.manual_seed(0)
