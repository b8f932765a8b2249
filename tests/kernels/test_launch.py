"""Cached Triton launches (deftune.kernels._launch): the key, the replay and the fallbacks, on a stand-in
kernel (the real launcher needs a GPU; tests/test_gpu.py runs the kernels through it on the card)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from deftune.kernels import _launch


class _FakeCompiled:
    def __init__(self, fail=False):
        self.calls, self.fail = [], fail
        self.function, self.packed_metadata = "fn-handle", "packed"

    def run(self, *args):
        if self.fail:
            raise TypeError("function takes 9 positional arguments")
        self.calls.append(args)


class _FakeJit:
    """Looks like a JITFunction to the wrapper: .params and kernel[grid](...) returning the compiled kernel."""

    def __init__(self, names, fail=False):
        self.params = [SimpleNamespace(name=n) for n in names]
        self.ordinary, self.compiled = [], _FakeCompiled(fail)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.ordinary.append((grid, args, kwargs))
            return self.compiled

        return launch


@pytest.fixture
def enabled(monkeypatch):
    monkeypatch.setattr(_launch, "_ENABLED", [True])
    monkeypatch.setattr(_launch, "triton_interpreting", lambda: False)
    monkeypatch.setattr(_launch, "_stream_source", lambda: (0, lambda device: f"stream{device}"))


def test_key_follows_what_triton_specialises_on():
    t = torch.zeros(64)
    key = _launch.specialization_key
    assert key((t, 16), {}) == key((torch.ones(64), 32), {})  # same dtype/alignment, both ints % 16
    assert key((t, 16), {}) != key((t[1:], 16), {})  # a pointer off the 16-byte grid
    assert key((t, 16), {}) != key((t.double(), 16), {})
    assert key((t, 16), {}) != key((t, 17), {}) != key((t, 1), {})
    assert key((t, 16), {}) != key((t, 2**33), {})  # 64-bit integer
    assert key((t, True), {}) != key((t, 1), {})
    assert key((t,), {"BLOCK": 64}) != key((t,), {"BLOCK": 128})


def test_same_key_replays_through_the_compiled_launcher(enabled):
    jit = _FakeJit(["X", "Y", "n", "BLOCK", "FLAG"])
    kernel = _launch.fast_launch(jit)
    x, y = torch.zeros(32), torch.zeros(32)
    kernel[(4,)](x, y, 32, BLOCK=8, FLAG=True)  # compiles: the ordinary route
    kernel[(5, 2)](x, y, 48, BLOCK=8, FLAG=True)  # same key: straight to the launcher
    assert len(jit.ordinary) == 1
    assert jit.compiled.calls == [(5, 2, 1, "stream0", "fn-handle", "packed", None, None, None, x, y, 48, 8, True)]
    kernel[(4,)](x[1:], y, 32, BLOCK=8, FLAG=True)  # another specialisation: ordinary route again
    assert len(jit.ordinary) == 2


def test_a_failing_launcher_turns_fast_launches_off(enabled):
    jit = _FakeJit(["X", "n", "BLOCK"], fail=True)
    kernel = _launch.fast_launch(jit)
    x = torch.zeros(8)
    kernel[(1,)](x, 8, BLOCK=8)
    with pytest.warns(UserWarning, match="fast Triton launches are off"):
        kernel[(1,)](x, 8, BLOCK=8)
    assert len(jit.ordinary) == 2 and not _launch._ENABLED[0]
    kernel[(1,)](x, 8, BLOCK=8)
    assert len(jit.ordinary) == 3


def test_defaults_and_disabled_take_the_ordinary_route(enabled, monkeypatch):
    jit = _FakeJit(["X", "n", "BLOCK"])
    kernel = _launch.fast_launch(jit)
    x = torch.zeros(8)
    for _ in range(2):
        kernel[(1,)](x, 8)  # BLOCK left to its default: not replayable
    assert len(jit.ordinary) == 2 and not jit.compiled.calls
    monkeypatch.setattr(_launch, "_ENABLED", [False])
    for _ in range(2):
        kernel[(1,)](x, 8, BLOCK=8)
    assert len(jit.ordinary) == 4 and not jit.compiled.calls
