"""Method ``full``: update the weights of the chosen modules (``adapter.targets`` / ``adapter.layers``),
everything else frozen.

    W <- W - lr * AdamW(dL/dW)      for W in the selected modules, kept as float32 master weights

Full fine-tuning restricted to a subset of modules, as in layer-selective tuning (Lee et al. 2019,
"What Would Elsa Do? Freezing Layers During Transformer Fine-Tuning", arXiv:1911.03090). The result is a
complete model folder (``model/``), so there is nothing to merge.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deftune.adapters.base import Method, train_in_float32
from deftune.adapters.lora.model import freeze_all
from deftune.adapters.stages import stage_targets_union
from deftune.errors import DeftuneError
from deftune.models.arch import select_sites
from deftune.models.load import load_model


class Full(Method):
    name = "full"
    output = "model"

    def check(self, recipe) -> None:
        if recipe.adapter.ranks:
            raise DeftuneError("adapter.ranks (dynamic rank) applies to method lora, not full")

    def attach(self, recipe, model: nn.Module, device: torch.device):
        a = recipe.adapter
        targets, layers = a.targets, a.layers
        if a.stages:
            targets, layers = stage_targets_union(a.stages, a.layers, model)
        freeze_all(model)
        try:
            sites = select_sites(model, targets, layers)
        except ValueError as exc:
            raise DeftuneError(f"adapter.targets/adapter.layers: {exc}") from exc
        train_in_float32(model.get_submodule(site.name) for site in sites)
        return None

    def save(self, model: nn.Module, spec, folder: Path, base_model: str) -> None:
        model.save_pretrained(folder, safe_serialization=True)

    def apply_saved(self, model: nn.Module, folder: Path) -> None:
        raise DeftuneError(f"{folder} is a complete model: load it as the model instead")

    def load(self, recipe, run: Path, device: torch.device):
        recipe.model.path = str(self.result_folder(run))
        model, tokenizer, _ = load_model(recipe.model, device)
        return model, tokenizer

    def merge(self, model: nn.Module) -> int:
        raise DeftuneError("a full run's model/ folder is already a plain model: there is nothing to merge")
