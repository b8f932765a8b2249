"""The NF4 tests run the real Triton dequantization kernel: on a GPU when there is one, else through
Triton's CPU interpreter. ``TRITON_INTERPRET=1`` must be set before any ``@triton.jit`` function is
defined; deftune defines its kernels lazily on first use, so setting it here, at collection, is early
enough."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest imports every conftest.py outside a package as the module "conftest", so after this file loads,
# `from conftest import tiny_recipe` in test files collected later (meaning tests/conftest.py) lands
# here; forward such names to a private copy of the root conftest rather than break those imports.
_root_spec = importlib.util.spec_from_file_location("_root_conftest",
                                                    Path(__file__).parents[1] / "conftest.py")
_root_conftest = importlib.util.module_from_spec(_root_spec)
_root_spec.loader.exec_module(_root_conftest)


def __getattr__(name: str):
    if name.startswith(("pytest_", "__", "collect_ignore")):  # pytest's own probes of a conftest
        raise AttributeError(name)
    return getattr(_root_conftest, name)
