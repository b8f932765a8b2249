"""Activation checkpointing with each layer's input kept in pinned CPU memory (``train.offload_activations``).

Checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost", arXiv:1604.06174) keeps
only each decoder layer's input and recomputes the layer in backward, so activation memory is
O(layers x B x T x H) instead of O(layers x everything a layer saves). Here even those inputs leave the GPU:

    forward:   h_i --(side CUDA stream, non_blocking)--> pinned CPU copy;  GPU h_i freed
    backward:  pinned copy --(non_blocking)--> GPU, then layer i is recomputed from it

so what stays on the GPU is about one layer's activations. The copy out overlaps the next layers'
compute (it runs on its own stream); the copy back of layer i-1's input is started on that stream as soon
as layer i's recompute begins, so it overlaps layer i's backward instead of stalling the compute stream.
Built on torch's non-reentrant checkpoint: the first forward runs on the real input (so the graph links
the layer's output to it), the recompute runs on the restored copy, which holds the same values.

MLP stash (``train.offload_mlp_layers``): in N layers the MLP's gate and up projection outputs -- the most
expensive part of a Llama layer to recompute, 2 x T x I values from 2 x T x H x I multiply-adds -- are
copied out too (:class:`MlpStash`), and the recompute takes them back instead of running those two GEMMs.
With the early stop of torch's checkpoint (the down projection's GEMM runs after the layer's last saved
tensor, see :mod:`deftune.kernels.lora_linear`), such a layer's recompute is only its attention half:
per token the recompute drops from the whole layer's forward FLOPs to q/k/v/o + attention (~25% of it on
Llama-3-8B). The price is PCIe traffic: 2 x T x I x 2 bytes per layer each way (470 MB at 8B, 8k tokens),
so N is chosen so that the copies hide behind compute (the copy-out queue is capped at
``MAX_PENDING_COPIES`` tensors: beyond it the compute stream waits instead of holding more GPU buffers).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import types

import torch
from torch import nn

from deftune.errors import DeftuneError
from deftune.fast_path.patch import stash_ready
from deftune.fast_path.stash import (
    MlpStash,
    OffloadedTensor,
    current_mlp_stash,
    offloaded_checkpoint,
)
from deftune.kernels.lora_linear import keep_dequantized_on_recompute
from deftune.models.arch import decoder_layers

__all__ = ["MlpStash", "OffloadedLayer", "OffloadedTensor", "current_mlp_stash",
           "enable_offloaded_checkpointing", "offloaded_checkpoint", "offloaded_layer", "wrap_decoder_layers"]

@dataclasses.dataclass
class OffloadedLayer:
    """What a wrapped decoder layer needs in its forward: the side stream for its copies, the chain its
    input copy joins (so the copy back of the layer below starts during this layer's backward), its index
    (0 starts a new forward pass) and its MLP stash, if any."""

    stream: object
    chain: dict
    index: int
    stash: MlpStash | None = None


# A wrapped layer carries its OffloadedLayer under this name, read and written only here; kept on the
# layer so that a copy of the model (copy.deepcopy) is wrapped too.
_STATE_ATTR = "_deftune_offloaded_layer"


def offloaded_layer(layer: nn.Module) -> OffloadedLayer | None:
    """The offload state of a decoder layer :func:`wrap_decoder_layers` wrapped (None for others)."""
    return vars(layer).get(_STATE_ATTR)


def _offloaded_layer_forward(self, hidden_states, *args, **kwargs):
    plain = functools.partial(type(self).forward, self)
    if not (self.training and torch.is_grad_enabled()):
        return plain(hidden_states, *args, **kwargs)
    state = vars(self)[_STATE_ATTR]
    chain = state.chain
    if state.index == 0:
        chain["last"] = None  # a new forward pass
    out, chain["last"] = offloaded_checkpoint(plain, hidden_states, *args, stream=state.stream,
                                              prev=chain["last"], stash=state.stash, **kwargs)
    return out


def spread(n: int, total: int) -> list[int]:
    """``n`` of ``range(total)`` spaced evenly (so copy-heavy layers alternate with ones that let the PCIe
    queue drain)."""
    return sorted({int((k + 0.5) * total / n) for k in range(n)}) if n else []


def wrap_decoder_layers(model: nn.Module, keep_top: int = 0, mlp_layers: int = 0, resident_layers: int = 0,
                        keep_dequantized: bool = False) -> int:
    """Make every decoder layer but the ``keep_top`` nearest the output (those keep their activations:
    ``train.checkpoint_skip``) run through :func:`offloaded_checkpoint` in training; the top
    ``resident_layers`` of them keep their MLP gate/up outputs on the GPU and ``mlp_layers`` of the others
    (spread evenly) in host memory (:class:`MlpStash`); with ``keep_dequantized`` their 4-bit projections
    hand the weight dequantized for the recompute on to the backward (``train.reuse_dequantized``, see
    :func:`deftune.kernels.lora_linear.base_weight`). Returns how many layers are checkpointed.

    No device check (CPU runs it with host copies, for tests); training uses
    :func:`enable_offloaded_checkpointing`.
    """
    layers = list(decoder_layers(model))
    layers = layers[: len(layers) - keep_top]
    if mlp_layers or resident_layers:
        _check_stashable(model, layers, mlp_layers, resident_layers)
    resident = set(range(len(layers) - resident_layers, len(layers)))
    stashed = set(spread(mlp_layers, len(layers) - resident_layers)) | resident
    stream = None
    chain = {"last": None}
    pending: collections.deque = collections.deque()
    below = None
    for index, layer in enumerate(layers):
        device = next(layer.parameters()).device
        if device.type == "cuda" and stream is None:
            stream = torch.cuda.Stream(device)
        state = OffloadedLayer(stream, chain, index)
        setattr(layer, _STATE_ATTR, state)
        if index in stashed:
            state.stash = MlpStash(stream, pending, resident=index in resident)
            state.stash.below = below
            below = state.stash
        layer.forward = types.MethodType(_offloaded_layer_forward, layer)
        if keep_dequantized:
            for module in layer.modules():
                if hasattr(module, "dequantize"):
                    keep_dequantized_on_recompute(module)
    return len(layers)


def _check_stashable(model: nn.Module, layers: list, mlp_layers: int, resident_layers: int = 0) -> None:
    if mlp_layers < 0 or resident_layers < 0 or mlp_layers + resident_layers > len(layers):
        raise DeftuneError(f"train.offload_mlp_layers={mlp_layers} + train.keep_mlp_layers={resident_layers}: "
                           f"must be 0..{len(layers)} together (the checkpointed decoder layers: all minus "
                           f"train.checkpoint_skip)")
    why = stash_ready(model)
    if why:
        key = "train.offload_mlp_layers" if mlp_layers else "train.keep_mlp_layers"
        raise DeftuneError(f"{key} needs {why}")


def enable_offloaded_checkpointing(model: nn.Module, device: torch.device, keep_top: int = 0,
                                   mlp_layers: int = 0, resident_layers: int = 0,
                                   keep_dequantized: bool = False) -> int:
    """``train.offload_activations``: checkpoint each decoder layer (but the top ``keep_top``) with its
    input in pinned CPU memory; ``train.offload_mlp_layers``: ``mlp_layers`` of them stash their MLP's
    gate/up outputs too; ``train.reuse_dequantized``: ``keep_dequantized``."""
    if torch.device(device).type != "cuda":
        raise DeftuneError("train.offload_activations needs a CUDA GPU")
    return wrap_decoder_layers(model, keep_top, mlp_layers, resident_layers, keep_dequantized)
