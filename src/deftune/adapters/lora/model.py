"""Attach LoRA layers to a model by role and layer, and take them off again (merge)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deftune.adapters.lora.layer import LoRALinear
from deftune.errors import DeftuneError
from deftune.models.arch import LinearSite, select_sites
from deftune.models.surgery import replace_module


@dataclass
class LoraSpec:
    """What was attached: enough to write PEFT's adapter_config.json and to attach again."""

    rank: int
    alpha: float
    dropout: float
    rslora: bool
    module_names: list[str]


def freeze_all(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)


def attach_lora(model: nn.Module, targets, layers, rank: int, alpha: float, dropout: float = 0.0,
                rslora: bool = False) -> LoraSpec:
    """Freeze the model and wrap each selected linear in a LoRALinear. Returns what was attached."""
    try:
        sites: list[LinearSite] = select_sites(model, targets, layers)
    except ValueError as exc:
        raise DeftuneError(f"adapter.targets/adapter.layers: {exc}") from exc
    freeze_all(model)
    for site in sites:
        base = model.get_submodule(site.name)
        if isinstance(base, LoRALinear):
            raise DeftuneError(f"{site.name} already carries a LoRA adapter")
        replace_module(model, site.name, LoRALinear(base, rank, alpha, dropout, rslora))
    return LoraSpec(rank, alpha, dropout, rslora, [s.name for s in sites])


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights keyed by module path: ``<path>.lora_A.weight`` / ``<path>.lora_B.weight``."""
    out = {}
    for name, module in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = module.lora_A.weight
        out[f"{name}.lora_B.weight"] = module.lora_B.weight
    return out


def unwrap_lora(model: nn.Module, name: str) -> nn.Linear:
    """Put the frozen base linear of LoRALinear ``name`` back in its place, dropping the update (a
    module with no adapter left, e.g. dynamic rank 0). Returns the base layer."""
    module = model.get_submodule(name)
    if not isinstance(module, LoRALinear):
        raise DeftuneError(f"{name} carries no LoRA adapter")
    replace_module(model, name, module.base_layer)
    return module.base_layer


def lora_ranks(model: nn.Module) -> dict[str, int]:
    """Current rank of every LoRA module (dynamic rank changes them during training)."""
    return {name: m.rank for name, m in lora_modules(model).items()}


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Replace every LoRALinear by a plain nn.Linear holding W0 + s B A. Returns how many merged."""
    modules = lora_modules(model)
    for name, module in modules.items():
        replace_module(model, name, module.merged_linear())
    return len(modules)
