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
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from deftune.errors import DeftuneError
from deftune.models.arch import decoder_layers

__all__ = ["OffloadedTensor", "enable_offloaded_checkpointing", "offloaded_checkpoint", "wrap_decoder_layers"]


class OffloadedTensor:
    """A detached copy of ``tensor`` in host memory, restorable to the tensor's device.

    CUDA: pinned host buffer filled on ``stream`` without blocking. CPU tensors (tests) take the same
    route with a plain synchronous copy, so the checkpoint logic is exercised without a GPU.
    """

    def __init__(self, tensor: torch.Tensor, stream=None):
        self.device = tensor.device
        self.requires_grad = tensor.requires_grad
        src = tensor.detach()
        self.event = None
        self.stream = stream
        self.prev: OffloadedTensor | None = None  # the layer below: prefetched when this one is restored
        self._gpu = None
        self._gpu_event = None
        if src.is_cuda:
            stream = stream or torch.cuda.current_stream(src.device)
            self.host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            # The copy must see the finished value, then run beside the compute stream.
            stream.wait_stream(torch.cuda.current_stream(src.device))
            with torch.cuda.stream(stream):
                self.host.copy_(src, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record(stream)
            # Without this the allocator could hand the block to the next layer before the copy read it.
            src.record_stream(stream)
        else:
            self.host = src.clone()

    def prefetch(self) -> None:
        """Start the copy back to the GPU on the side stream (CUDA only; a no-op when already started)."""
        if self.event is None or self._gpu is not None:
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.event)
            self._gpu = self.host.to(self.device, non_blocking=True)
            self._gpu_event = torch.cuda.Event()
            self._gpu_event.record(self.stream)

    def restore(self) -> torch.Tensor:
        if self.event is not None:
            current = torch.cuda.current_stream(self.device)
            self.prefetch()
            current.wait_event(self._gpu_event)
            out, self._gpu = self._gpu, None
            # Made on the side stream, used and freed on the compute stream.
            out.record_stream(current)
            if self.prev is not None:
                self.prev.prefetch()
        else:
            out = self.host.clone()
        # Same requires_grad as in forward, so the recompute saves the same tensors (checked by torch).
        return out.requires_grad_(self.requires_grad)


def offloaded_checkpoint(fn, hidden: torch.Tensor, *args, stream=None, prev=None, **kwargs):
    """``fn(hidden, *args, **kwargs)`` checkpointed, with ``hidden`` held only as an OffloadedTensor.
    ``prev`` is the box of the layer run just before (prefetched back when this one is restored)."""
    box = OffloadedTensor(hidden, stream)
    box.prev = prev
    live = [hidden]

    def run(_device_marker, *a, **kw):
        # First forward: the real input (its autograd edge). Recompute in backward: the restored copy.
        h = live[0] if live[0] is not None else box.restore()
        return fn(h, *a, **kw)

    # The empty marker only tells checkpoint which device's RNG state to stash; passing `hidden` itself
    # would keep it alive on the GPU until backward, which is what this module avoids.
    out = checkpoint(run, hidden.new_empty(0), *args, use_reentrant=False, **kwargs)
    live[0] = None
    return out, box


def _offloaded_layer_forward(self, hidden_states, *args, **kwargs):
    plain = functools.partial(type(self).forward, self)
    if not (self.training and torch.is_grad_enabled()):
        return plain(hidden_states, *args, **kwargs)
    chain = self._deftune_offload_chain
    if self._deftune_offload_index == 0:
        chain["last"] = None  # a new forward pass
    out, chain["last"] = offloaded_checkpoint(plain, hidden_states, *args, stream=self._deftune_offload_stream,
                                              prev=chain["last"], **kwargs)
    return out


def wrap_decoder_layers(model: nn.Module, keep_top: int = 0) -> int:
    """Make every decoder layer but the ``keep_top`` nearest the output (those keep their activations:
    ``train.checkpoint_skip``) run through :func:`offloaded_checkpoint` in training. Returns the count.

    No device check (CPU runs it with host copies, for tests); training uses
    :func:`enable_offloaded_checkpointing`.
    """
    layers = list(decoder_layers(model))
    layers = layers[: len(layers) - keep_top]
    stream = None
    chain = {"last": None}
    for index, layer in enumerate(layers):
        device = next(layer.parameters()).device
        if device.type == "cuda" and stream is None:
            stream = torch.cuda.Stream(device)
        layer._deftune_offload_stream = stream
        layer._deftune_offload_chain = chain
        layer._deftune_offload_index = index
        layer.forward = types.MethodType(_offloaded_layer_forward, layer)
    return len(layers)


def enable_offloaded_checkpointing(model: nn.Module, device: torch.device, keep_top: int = 0) -> int:
    """``train.offload_activations``: checkpoint each decoder layer (but the top ``keep_top``) with its
    input in pinned CPU memory."""
    if torch.device(device).type != "cuda":
        raise DeftuneError("train.offload_activations needs a CUDA GPU")
    return wrap_decoder_layers(model, keep_top)
