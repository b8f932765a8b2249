"""Triton kernel launches with the JIT's per-call host work cached (experimental, off by default).

``kernel[grid](*args)`` runs Triton's Python dispatch on every call: bind the arguments, specialise each
one (dtype, 16-byte alignment of pointers, integers equal to 1 or divisible by 16, 32- or 64-bit), build
the cache key, look the compiled kernel up, then launch. On the H200 host that is ~80 us of Python per
launch, ~250 launches in a Llama-1B training step (~570 with 4-bit weights), while the kernels themselves
often run for 20-50 us: the step becomes bound by the host (bench/results/profiles/).

:func:`fast_launch` wraps a ``@triton.jit`` kernel so that, after the ordinary launch has compiled it for
one specialisation, later calls with the same specialisation key (computed here, in a few microseconds,
from the same properties Triton specialises on) go straight to the compiled kernel's launcher
(``CompiledKernel.run`` with the grid, stream, function handle and every argument in parameter order,
constexprs included). The launcher is an internal interface of Triton: the first fast launch that raises
switches the fast path off for the process (with a warning) and every launch takes the ordinary route.

Off unless ``DEFTUNE_FAST_LAUNCH=1``: it becomes the default only after the GPU tests and a same-call
benchmark on the card (tests/test_gpu.py, bench/gpu_peers.py variants with ``env:``) confirm it.
Under ``TRITON_INTERPRET=1`` (the CPU tests) kernels always take the ordinary route.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from deftune.kernels import triton_interpreting

__all__ = ["fast_launch", "specialization_key"]

_ENABLED = [os.environ.get("DEFTUNE_FAST_LAUNCH", "0") == "1"]
_INT32 = (-(2**31), 2**31)


def _arg_key(value):
    # Mirrors what Triton specialises a compiled kernel on, so one compiled kernel serves one key.
    if isinstance(value, torch.Tensor):  # the device too: a compiled kernel's handle belongs to one GPU
        return (value.dtype, value.data_ptr() % 16 == 0, value.device.index)
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, int):
        # Triton types an int by its range (i32, i64, u64) and compiles 1 and multiples of 16 in.
        return ("i", value == 1, value % 16 == 0, _INT32[0] <= value < _INT32[1], value >= 2**63)
    if isinstance(value, float):
        return ("f",)
    return ("c", value)  # None and other constants are compiled in


def specialization_key(args: tuple, kwargs: dict) -> tuple:
    """The properties of a call that select a compiled kernel: per positional argument its specialisation
    (:func:`_arg_key`), and the keyword arguments (constexprs and launch options) by value."""
    return tuple(_arg_key(a) for a in args) + tuple(kwargs.items())


class _FastLaunch:
    """``kernel[grid](...)`` for a wrapped ``@triton.jit`` kernel; see the module docstring."""

    def __init__(self, fn):
        self.fn = fn
        self.launchers: dict = {}
        functools.update_wrapper(self, getattr(fn, "fn", fn), updated=())

    def __getitem__(self, grid):
        return functools.partial(self._call, grid)

    def _call(self, grid, *args, **kwargs):
        if not _ENABLED[0] or callable(grid) or triton_interpreting():
            return self.fn[grid](*args, **kwargs)
        key = specialization_key(args, kwargs)
        launch = self.launchers.get(key)
        if launch is None:
            compiled = self.fn[grid](*args, **kwargs)  # the ordinary route compiles (once) and launches
            self.launchers[key] = self._launcher(compiled, len(args), kwargs) or False
            return compiled
        if launch is False:  # this call shape cannot use the fast route
            return self.fn[grid](*args, **kwargs)
        try:
            launch(grid, args, kwargs)
        except Exception as exc:  # the launcher's interface differs in this Triton: use the ordinary route
            _ENABLED[0] = False
            warnings.warn(f"deftune: fast Triton launches are off ({type(exc).__name__}: {exc}); using "
                          "the standard launch", stacklevel=2)
            return self.fn[grid](*args, **kwargs)
        return None

    def _launcher(self, compiled, n_positional: int, kwargs: dict):
        """A closure launching ``compiled`` directly, or None when this call cannot be replayed that way."""
        run = getattr(compiled, "run", None)
        function = getattr(compiled, "function", None)
        packed = getattr(compiled, "packed_metadata", None)
        if run is None or function is None or packed is None:
            return None
        params = [p.name for p in self.fn.params]
        tail = params[n_positional:]
        if any(name not in kwargs for name in tail):  # a parameter left to its default: not replayable
            return None
        hooks = _launch_hooks()
        if hooks is None:  # a profiler's launch hooks want the ordinary route's metadata
            return None
        enter, leave = hooks  # both None
        device, get_stream = _stream_source()

        def launch(grid, args, kw):
            full = (*args, *(kw[name] for name in tail))
            run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                get_stream(device), function, packed, None, enter, leave, *full)

        return launch


def _stream_source():
    """(current device, stream getter) from Triton's active driver -- what its own launch uses."""
    from triton.runtime import driver

    return driver.active.get_current_device(), driver.active.get_current_stream


def _launch_hooks():
    """(None, None) when no launch hook is registered (the launcher then skips them), else None."""
    try:
        from triton import knobs

        hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    except (ImportError, AttributeError):
        from triton.compiler.compiler import CompiledKernel

        hooks = (getattr(CompiledKernel, "launch_enter_hook", None),
                 getattr(CompiledKernel, "launch_exit_hook", None))
    # Newer Triton keeps a chain of hooks (empty unless a profiler registered one) instead of None.
    if all(h is None or not getattr(h, "calls", True) for h in hooks):
        return None, None
    return None


def fast_launch(fn):
    """Wrap a top-level ``@triton.jit`` kernel (not one called from other kernels) for cached launches."""
    return _FastLaunch(fn)
