"""Process-rank helpers. Logging and saving go through ``is_main_process`` and model wrapping through
``wrap_model``, so running the same trainer under torchrun with FSDP2 changes this file only."""

from __future__ import annotations

import os

from torch import nn

from deftune.errors import DeftuneError


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def wrap_model(model: nn.Module) -> nn.Module:
    """The one place the model is wrapped for parallel training. Single process: unchanged."""
    if world_size() > 1:
        raise DeftuneError(
            "Multi-GPU training (WORLD_SIZE > 1) is not available yet: run on one GPU or on the CPU."
        )
    return model
