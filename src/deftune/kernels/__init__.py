"""Fused Triton kernels with hand-written backward passes, each beside its pure-PyTorch reference.

Every op lives in its own module in three layers: the Triton kernel with its ``torch.autograd.Function``,
a pure-PyTorch reference (also the CPU path), and a public function that picks one of the two with
:func:`use_triton`. Triton is imported lazily, so ``import deftune`` never needs it (extra ``kernels``).

- :func:`~deftune.kernels.rmsnorm.rms_norm` -- RMSNorm (Zhang & Sennrich 2019).
- :func:`~deftune.kernels.rope.rope_qk` -- rotary position embedding on Q and K (Su et al. 2021).
- :func:`~deftune.kernels.swiglu.swiglu` -- ``silu(gate) * up`` (Shazeer 2020).
- :func:`~deftune.kernels.linear_ce.linear_cross_entropy` -- LM head + cross-entropy without the full
  logits matrix (Wijmans et al. 2024).
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["triton_available", "triton_interpreting", "use_triton"]


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when ``triton`` imports (install the ``kernels`` extra: ``pip install 'deftune[kernels]'``)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install (e.g. missing compiler bits) must fall back, not crash
        return False
    return True


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors through its interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """The dispatch rule shared by every op: Triton when it imports and either all ``tensors`` are on
    CUDA or ``TRITON_INTERPRET=1`` is set (the CPU test path); otherwise the PyTorch reference."""
    # Cheap checks first: importing triton is slow and pointless for CPU tensors outside the interpreter.
    if not (triton_interpreting() or all(t.is_cuda for t in tensors)):
        return False
    return triton_available()
