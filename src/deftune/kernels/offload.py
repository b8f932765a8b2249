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
import contextvars
import functools
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from deftune.errors import DeftuneError
from deftune.models.arch import decoder_layers

__all__ = ["MlpStash", "OffloadedTensor", "current_mlp_stash", "enable_offloaded_checkpointing",
           "offloaded_checkpoint", "wrap_decoder_layers"]

# Copy-out tensors allowed in flight before the compute stream waits (one stashed MLP's gate and up:
# more would hold that much more GPU memory while the PCIe link catches up).
MAX_PENDING_COPIES = 2
_STASH: contextvars.ContextVar[MlpStash | None] = contextvars.ContextVar("deftune_mlp_stash", default=None)
_RECOMPUTING: contextvars.ContextVar[bool] = contextvars.ContextVar("deftune_recomputing", default=False)


def current_mlp_stash() -> MlpStash | None:
    """The stash of the layer whose checkpointed forward is running now (None outside one)."""
    return _STASH.get()


def recomputing() -> bool:
    """True while an offloaded layer is being recomputed in backward (not in its first forward)."""
    return _RECOMPUTING.get()


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


class MlpStash:
    """One layer's MLP projection outputs kept in host memory between its forward and its recompute.

    Activation offloading to host memory (Rhu et al. 2016, "vDNN", arXiv:1602.08124) of the tensors whose
    recompute costs the most FLOPs per byte moved: gate = x Wg^T and up = x Wu^T, 2 T H I multiply-adds
    each for T I values, so each byte saves about H FLOPs of recompute.

    ``recording`` (first forward): :meth:`keep` copies each output out on the side stream. Recompute:
    :meth:`take` hands them back in the same order. ``below`` is the next stashed layer under this one: its
    copies back start when this layer's are consumed, so they overlap this layer's backward.
    ``resident`` (``train.keep_mlp_layers``): the outputs stay on the GPU instead (no copies; the memory is
    held from the layer's forward to its backward), for layers where GPU memory is cheaper than PCIe time.
    """

    def __init__(self, stream=None, pending: collections.deque | None = None, resident: bool = False):
        self.stream = stream
        self.pending = pending if pending is not None else collections.deque()
        self.resident = resident
        self.boxes: list = []
        self.recording = True
        self.cursor = 0
        self.below: MlpStash | None = None

    def start(self, recording: bool) -> None:
        self.recording = recording
        self.cursor = 0
        if recording:
            self.boxes = []

    def keep(self, tensor: torch.Tensor) -> None:
        if self.resident:
            self.boxes.append(tensor.detach())
            return
        if tensor.is_cuda:
            # Bound the GPU memory held by copies that have not finished: wait (on the GPU, no host sync)
            # for the oldest before queueing another.
            current = torch.cuda.current_stream(tensor.device)
            while len(self.pending) >= MAX_PENDING_COPIES:
                current.wait_event(self.pending.popleft())
        box = OffloadedTensor(tensor.detach(), self.stream)
        if box.event is not None:
            self.pending.append(box.event)
        self.boxes.append(box)

    def prefetch(self) -> None:
        if not self.resident:
            for box in self.boxes:
                box.prefetch()

    def take(self) -> torch.Tensor:
        if self.cursor >= len(self.boxes):
            raise RuntimeError("MLP stash: the recompute asked for more tensors than the forward kept")
        box = self.boxes[self.cursor]
        self.cursor += 1
        out = box if self.resident else box.restore()
        if self.cursor == len(self.boxes):
            self.boxes = []  # the host copies are released once the last is back on the GPU
            if self.below is not None:
                self.below.prefetch()
        return out


def offloaded_checkpoint(fn, hidden: torch.Tensor, *args, stream=None, prev=None, stash=None, **kwargs):
    """``fn(hidden, *args, **kwargs)`` checkpointed, with ``hidden`` held only as an OffloadedTensor.
    ``prev`` is the box of the layer run just before (prefetched back when this one is restored);
    ``stash`` an :class:`MlpStash` made current while ``fn`` runs (forward: recording; recompute: replay)."""
    box = OffloadedTensor(hidden, stream)
    box.prev = prev
    live = [hidden]

    def run(_device_marker, *a, **kw):
        # First forward: the real input (its autograd edge). Recompute in backward: the restored copy.
        first = live[0] is not None
        h = live[0] if first else box.restore()
        if stash is not None:
            stash.start(recording=first)
        token = _STASH.set(stash)
        again = _RECOMPUTING.set(not first)
        try:  # also left by torch's early-stop exception, which ends the recompute after the last save
            return fn(h, *a, **kw)
        finally:
            _RECOMPUTING.reset(again)
            _STASH.reset(token)

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
                                              prev=chain["last"], stash=self._deftune_mlp_stash, **kwargs)
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
        layer._deftune_offload_stream = stream
        layer._deftune_offload_chain = chain
        layer._deftune_offload_index = index
        layer._deftune_mlp_stash = None
        if index in stashed:
            layer._deftune_mlp_stash = MlpStash(stream, pending, resident=index in resident)
            layer._deftune_mlp_stash.below = below
            below = layer._deftune_mlp_stash
        layer.forward = types.MethodType(_offloaded_layer_forward, layer)
        if keep_dequantized:
            for module in layer.modules():
                if hasattr(module, "dequantize"):
                    module._deftune_keep_dequantized = True
    return len(layers)


def _check_stashable(model: nn.Module, layers: list, mlp_layers: int, resident_layers: int = 0) -> None:
    from deftune.kernels.patch import stash_ready

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
