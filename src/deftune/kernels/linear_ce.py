"""LM head + cross-entropy without materialising the [N, V] logits.

    loss_i = logsumexp_v(z_i) - z_{i, y_i},    z = hidden @ weight^T   (optionally z = c * tanh(z / c))

summed or averaged over the rows whose target is not ``-100``. The idea (never hold all logits; fold the
softmax gradient into the small operands right away) is that of Wijmans et al. 2024, "Cut Your Losses in
Large-Vocabulary Language Models", arXiv:2411.09009. Here the rows are processed in chunks: the chunk's
logits come from a torch matmul, one Triton kernel computes the loss and overwrites the logits with
``dloss/dz = softmax(z) - onehot(y)`` in place, and that gradient is turned into ``grad_hidden`` (and
``grad_weight`` when the head is trainable) before the next chunk. The backward pass only scales
the stored gradients by ``grad_output``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deftune.kernels import use_triton

__all__ = ["IGNORE_INDEX", "linear_cross_entropy", "linear_cross_entropy_reference"]

IGNORE_INDEX = -100


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "mean",
    softcap: float | None = None,
) -> torch.Tensor:
    """Pure-PyTorch ``F.cross_entropy(F.linear(hidden, weight).float(), targets)`` (ignore -100).

    With ``softcap=c`` the float32 logits become ``c * tanh(z / c)`` first (Gemma-2 style).
    """
    logits = F.linear(hidden, weight).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction=reduction)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "mean",
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden`` [N, H] through the head ``weight`` [V, H] against ``targets`` [N].

    ``targets`` are int64 class ids, ``-100`` = ignored row; ``reduction`` is ``"sum"`` or ``"mean"``
    (over non-ignored rows, as ``F.cross_entropy``); ``softcap=c`` caps logits to ``c * tanh(z / c)``.
    On CUDA (or under ``TRITON_INTERPRET=1``) runs chunked and fused (module doc) with ``chunk_size``
    rows per chunk (default: sized so a chunk's float32 logits stay small); else the reference.
    A frozen head (``weight.requires_grad`` False, the LoRA case) gets no gradient buffer at all.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if use_triton(hidden, weight, targets):
        # the Triton module imports triton (optional extra `kernels`)
        from deftune.kernels._linear_ce_triton import linear_cross_entropy_triton

        return linear_cross_entropy_triton(hidden, weight, targets, reduction, softcap, chunk_size)
    return linear_cross_entropy_reference(hidden, weight, targets, reduction, softcap)
