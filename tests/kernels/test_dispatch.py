"""The dispatch rule shared by the kernels, and that importing them does not import triton."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from deftune.kernels import use_triton


def test_importing_the_kernels_does_not_import_triton():
    code = (
        "import sys, torch, deftune\n"
        "from deftune.kernels import linear_ce, rmsnorm, rope, swiglu\n"
        "x = torch.randn(2, 8)\n"
        "rmsnorm.rms_norm(x, torch.ones(8), 1e-6); swiglu.swiglu(x, x)\n"  # CPU, no interpreter: reference
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_cpu_tensors_use_triton_only_under_the_interpreter(monkeypatch):
    cpu = torch.empty(1)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not use_triton(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(cpu)
