"""``model.sdpa_backend``: which kernel torch's scaled_dot_product_attention tries first.

Attention itself is unchanged, softmax(Q K^T / sqrt(d) + causal mask) V (Vaswani et al. 2017,
arXiv:1706.03762); what changes is the implementation torch dispatches to. On Hopper GPUs torch's
default order picks FlashAttention-2 (Dao 2023, arXiv:2307.08691), while cuDNN's fused attention
(``cudnn``) is often faster there; the choice is a measurement (``bench/gpu_peers.py --variants``), so
it is a recipe key rather than a default. The preferred backend goes first in the priority list and
torch falls back down the list when it cannot run the given inputs (dtype, head size, mask), so
setting it never breaks a model.
"""

from __future__ import annotations

import types

from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from deftune.errors import DeftuneError
from deftune.models.surgery import pieces

__all__ = ["BACKENDS", "prefer_sdpa_backend"]

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def prefer_sdpa_backend(model: nn.Module, name: str) -> int:
    """Run every attention module's forward (and so its recompute under checkpointing) with ``name``'s
    kernel first in torch's SDPA priority list. Returns how many modules were wrapped."""
    if name not in BACKENDS:
        raise DeftuneError(f"model.sdpa_backend must be auto or one of {', '.join(BACKENDS)}, got {name!r}")
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "sdpa":
        raise DeftuneError(f"model.sdpa_backend={name} applies to model.attn_implementation=sdpa; this model "
                           f"runs {impl!r} attention")
    order = [BACKENDS[name]] + [b for b in BACKENDS.values() if b != BACKENDS[name]]
    count = 0
    for _name, attention in pieces(model).attention:
        inner = attention.forward  # the bound forward in use now (the fast path's, if it patched this one)

        def forward(self, *args, _inner=inner, **kwargs):
            with sdpa_kernel(order, set_priority=True):
                return _inner(*args, **kwargs)

        attention.forward = types.MethodType(forward, attention)
        count += 1
    return count
