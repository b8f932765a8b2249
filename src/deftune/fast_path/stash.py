"""Tensors kept in host memory between a checkpointed layer's forward and its recompute.

:class:`OffloadedTensor` holds one tensor as a pinned CPU copy (copied out on a side CUDA stream);
:class:`MlpStash` keeps a layer's MLP gate/up outputs so its recompute need not run those GEMMs;
:func:`offloaded_checkpoint` runs a layer under torch's non-reentrant checkpoint with its input offloaded.
The layer wrapping that uses them is :mod:`deftune.fast_path.offload`.
"""

from __future__ import annotations

import collections
import contextvars

import torch
from torch.utils.checkpoint import checkpoint

from deftune.kernels.lora_linear import recompute_scope

__all__ = ["MAX_PENDING_COPIES", "MlpStash", "OffloadedTensor", "current_mlp_stash", "offloaded_checkpoint"]

# Copy-out tensors allowed in flight before the compute stream waits (one stashed MLP's gate and up:
# more would hold that much more GPU memory while the PCIe link catches up).
MAX_PENDING_COPIES = 2
_STASH: contextvars.ContextVar[MlpStash | None] = contextvars.ContextVar("deftune_mlp_stash", default=None)


def current_mlp_stash() -> MlpStash | None:
    """The stash of the layer whose checkpointed forward is running now (None outside one)."""
    return _STASH.get()


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
        try:  # also left by torch's early-stop exception, which ends the recompute after the last save
            with recompute_scope(not first):
                return fn(h, *a, **kw)
        finally:
            _STASH.reset(token)

    # The empty marker only tells checkpoint which device's RNG state to stash; passing `hidden` itself
    # would keep it alive on the GPU until backward, which is what this module avoids.
    out = checkpoint(run, hidden.new_empty(0), *args, use_reentrant=False, **kwargs)
    live[0] = None
    return out, box


