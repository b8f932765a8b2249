"""What a tuning method is: the interface every entry of the registry (:mod:`deftune.adapters.methods`)
implements, and the helpers the built-in methods share.

A method decides which parameters train (``attach``), what a run saves (``save``), how a saved result is
put back onto a freshly loaded base model (``apply_saved`` / ``load``) and how it folds into the base
weights (``merge``). Its ``check(recipe)`` runs when the recipe is read, before any model loads, so a
wrong setting fails in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deftune.errors import DeftuneError
from deftune.models.load import load_model


class Method:
    """One tuning method. Subclass it, set ``name`` and ``output``, implement ``attach``, ``save`` and
    ``apply_saved`` (and ``merge`` when the result can be folded into the base), then ``register`` it."""

    name = ""
    # The run's sub-folder holding the result (``adapter/``, ``model/``, ...).
    output = ""
    # Whether the method can train over a 4-bit base (model.quantize=nf4): only adapters can, a 4-bit
    # weight has no gradient to follow.
    quantized_base = False

    def check(self, recipe) -> None:
        """Refuse settings this method cannot honour (raise DeftuneError naming the key)."""

    def attach(self, recipe, model: nn.Module, device: torch.device):
        """Freeze ``model`` and make what this method trains trainable (on ``device``); returns a spec that
        ``save`` receives (whatever the method needs to write its result), or None."""
        raise NotImplementedError

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def save(self, model: nn.Module, spec, folder: Path, base_model: str) -> None:
        """Write what the method trained into ``folder`` (which exists)."""
        raise NotImplementedError

    def apply_saved(self, model: nn.Module, folder: Path) -> None:
        """Put what ``save`` wrote in ``folder`` onto a freshly loaded base ``model``."""
        raise NotImplementedError

    def load(self, recipe, run: Path, device: torch.device):
        """``(model, tokenizer)``: the base model of ``recipe`` with the run's result applied."""
        folder = self.result_folder(run)
        model, tokenizer, _ = load_model(recipe.model, device)
        self.apply_saved(model, folder)
        model.to(device)
        return model, tokenizer

    def merge(self, model: nn.Module) -> int:
        """Fold the trained update into the base weights in place; returns how many modules merged."""
        raise DeftuneError(f"method {self.name} has no merge")

    def result_folder(self, run: Path) -> Path:
        folder = Path(run) / self.output
        if not folder.is_dir():
            raise DeftuneError(f"{run} has no {self.output}/ folder: the run did not finish "
                               f"(resume it with train.resume=auto output_dir={run})")
        return folder


def train_in_float32(modules) -> int:
    """Make every parameter of ``modules`` trainable as a float32 master copy: bf16 weights cannot absorb
    small AdamW updates. Returns how many parameters."""
    count = 0
    for module in modules:
        for param in module.parameters():
            param.data = param.data.float()
            param.requires_grad_(True)
            count += 1
    return count
