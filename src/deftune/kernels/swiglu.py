"""SwiGLU activation (Shazeer 2020, "GLU Variants Improve Transformer", arXiv:2002.05202).

    h = silu(g) * u = g * sigmoid(g) * u

the gated product inside a Llama MLP, ``down(silu(gate(x)) * up(x))``. Backward, with ``s = sigmoid(g)``:

    du = dh * g * s,    dg = dh * u * s * (1 + g * (1 - s))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deftune.kernels import use_triton

__all__ = ["swiglu", "swiglu_backward_", "swiglu_backward_with_values_", "swiglu_reference", "swiglu_values"]


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch SwiGLU: ``silu(gate) * up``."""
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor, inplace_backward: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` elementwise (same shapes), fused in Triton on CUDA (or under
    ``TRITON_INTERPRET=1``), else the reference. The backward recomputes ``sigmoid(gate)`` from the saved
    inputs instead of keeping extra activations. ``inplace_backward``: the Triton backward writes the
    gradients over ``gate`` and ``up`` -- only for callers that never read those tensors after backward
    (the patched MLP, whose gate/up outputs feed nothing else)."""
    if use_triton(gate, up):
        # the Triton module imports triton (optional extra `kernels`)
        from deftune.kernels._swiglu_triton import swiglu_triton

        return swiglu_triton(gate, up, inplace_backward)
    return swiglu_reference(gate, up)


def swiglu_values(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` without autograd (for Functions with their own backward)."""
    if use_triton(gate, up):
        # the Triton module imports triton (optional extra `kernels`)
        from deftune.kernels._swiglu_triton import swiglu_fwd

        return swiglu_fwd(gate.contiguous(), up.contiguous())
    return swiglu_reference(gate, up)


def swiglu_backward_(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) of ``silu(gate) * up`` for the upstream ``dh`` (formulas in the module docstring),
    written over ``gate`` and ``up`` (contiguous), which the caller must not need afterwards."""
    if use_triton(dh, gate, up):
        # the Triton module imports triton (optional extra `kernels`)
        from deftune.kernels._swiglu_triton import swiglu_bwd_

        return swiglu_bwd_(dh, gate, up)
    g, u, d = gate.float(), up.float(), dh.float()  # float32 inputs: these are gate and up themselves
    s = torch.sigmoid(g)
    dg, du = d * u * s * (1 + g * (1 - s)), d * g * s  # both computed before either input is written
    gate.copy_(dg)
    up.copy_(du)
    return gate, up


def swiglu_backward_with_values_(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """:func:`swiglu_backward_` that also returns ``h = silu(gate) * up``, written over ``dh``: one pass
    reads dh, g and u once and writes dg, du and h in their places (each element is read before any of
    the three is written). ``gate``, ``up`` (contiguous) and ``dh`` must not be needed afterwards.
    Returns ``dh`` holding h (in dh's dtype)."""
    if use_triton(dh, gate, up):
        # the Triton module imports triton (optional extra `kernels`)
        from deftune.kernels._swiglu_triton import swiglu_bwd_values_

        return swiglu_bwd_values_(dh, gate, up)
    g, u, d = gate.float(), up.float(), dh.float()
    s = torch.sigmoid(g)
    dg, du, h = d * u * s * (1 + g * (1 - s)), d * g * s, g * s * u
    gate.copy_(dg)
    up.copy_(du)
    dh.copy_(h)
    return dh
