"""Sequence-tiled MLP for long context (``train.mlp_tile_tokens``).

A decoder MLP acts on every token independently, y_t = down(act(gate x_t) * up x_t), so it can run over
the tokens in tiles of n without changing any value. Each tile runs under activation checkpointing
(Chen et al. 2016, arXiv:1604.06174): forward keeps only the tile's input, backward recomputes that tile's
intermediate [n, I] tensors (I = intermediate size, 3.5x the hidden size on Llama) and frees them before
the next tile. At T tokens the MLP's activation peak drops from ~3 T I values to ~3 n I, which is what
bounds the context length once layer inputs are offloaded; the price is one more MLP forward per step.
Nested inside the layer's own checkpoint (gradient checkpointing or train.offload_activations) this is
torch's non-reentrant checkpoint within checkpoint, which torch supports.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from deftune.errors import DeftuneError
from deftune.models.surgery import pieces

__all__ = ["tile_mlps", "tiled_forward"]


def tiled_forward(forward, x: torch.Tensor, tile: int) -> torch.Tensor:
    """``forward(x)`` over tiles of ``tile`` tokens of x [..., H] (all leading dims flattened)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] <= tile or not torch.is_grad_enabled():
        return forward(x)
    outs = [checkpoint(forward, part, use_reentrant=False) for part in rows.split(tile, dim=0)]
    out = torch.cat(outs, 0)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def tile_mlps(model: nn.Module, tile: int) -> int:
    """Run every decoder MLP over ``tile``-token tiles in training. Returns how many were wrapped."""
    if tile < 1:
        raise DeftuneError(f"train.mlp_tile_tokens must be >= 1 to tile (0 = off), got {tile}")
    count = 0
    for _name, mlp in pieces(model).mlps:
        inner = mlp.forward  # the bound forward in use now (the fast path's, if it patched this MLP)

        def forward(self, x, _inner=inner):
            if not self.training:
                return _inner(x)
            return tiled_forward(_inner, x, tile)

        mlp.forward = types.MethodType(forward, mlp)
        count += 1
    return count
