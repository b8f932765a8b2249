"""A method as a user would add one: this module plus one ``register`` line (see test_methods.py).

Norm tuning: only the decoder layers' RMSNorm gains train (float32 master copies),

    y = g * x / sqrt(mean(x^2) + eps),   g trained, everything else frozen

as in LayerNorm tuning (Zhao et al. 2023, "Tuning LayerNorm in Attention", arXiv:2312.11420). The result
is the gains alone, in one safetensors file; they live in the base weights, so merging has nothing to fold.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deftune.adapters.base import Method, train_in_float32
from deftune.adapters.lora.model import freeze_all
from deftune.models.arch import decoder_layers


def _norms(model: nn.Module) -> dict[str, nn.Module]:
    layers = decoder_layers(model)
    return {name: m for name, m in model.named_modules()
            if "norm" in type(m).__name__.lower() and any(m is x for layer in layers for x in layer.modules())}


class NormTuning(Method):
    name = "toy"
    output = "norms"

    def attach(self, recipe, model: nn.Module, device: torch.device):
        freeze_all(model)
        train_in_float32(_norms(model).values())
        model.to(device)
        return None

    def save(self, model: nn.Module, spec, folder: Path, base_model: str) -> None:
        tensors = {f"{n}.weight": m.weight.detach().float().cpu().contiguous() for n, m in _norms(model).items()}
        save_file(tensors, str(folder / "norms.safetensors"))

    def apply_saved(self, model: nn.Module, folder: Path) -> None:
        saved = load_file(str(folder / "norms.safetensors"))
        with torch.no_grad():
            for name, module in _norms(model).items():
                module.weight.copy_(saved[f"{name}.weight"])

    def merge(self, model: nn.Module) -> int:
        return len(_norms(model))  # the gains are the base's own weights already
