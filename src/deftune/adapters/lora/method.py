"""Method ``lora``: low-rank adapters on the chosen linear layers, base frozen (QLoRA over a 4-bit base).

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685):

    h = W0 x + (alpha / r) B A x,    A [r, in] random, B [out, r] zero at the start, W0 frozen

(``adapter.rslora``: alpha / sqrt(r), Kalajdzievski 2023, arXiv:2312.03732). Over a 4-bit NF4 base
(``model.quantize=nf4``) this is QLoRA (Dettmers et al. 2023, arXiv:2305.14314). Saved in PEFT's format
(``adapter/``); merging writes W0 + (alpha / r) B A into the base.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deftune.adapters.base import Method
from deftune.adapters.dynamic_rank import initial_rank
from deftune.adapters.lora.model import attach_lora, merge_lora
from deftune.adapters.peft_format import load_adapter, save_adapter
from deftune.adapters.stages import stage_targets_union


class LoRA(Method):
    name = "lora"
    output = "adapter"
    quantized_base = True

    def attach(self, recipe, model: nn.Module, device: torch.device):
        a = recipe.adapter
        targets, layers = a.targets, a.layers
        if a.stages:
            # Every stage's adapters exist from the start (so they are saved and resumable); the
            # progressive-unfreezing callback decides which of them train when.
            targets, layers = stage_targets_union(a.stages, a.layers, model)
        # Dynamic rank starts every module at the largest candidate and shrinks it during training.
        spec = attach_lora(model, targets, layers, initial_rank(a), a.alpha, a.dropout, a.rslora)
        model.to(device)
        return spec

    def save(self, model: nn.Module, spec, folder: Path, base_model: str) -> None:
        save_adapter(model, spec, folder, base_model)

    def apply_saved(self, model: nn.Module, folder: Path) -> None:
        load_adapter(model, folder)

    def merge(self, model: nn.Module) -> int:
        return merge_lora(model)
