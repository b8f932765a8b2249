"""The gradient-mask training callback: freezes what the name/layer masks exclude and keeps the FISH
mask's excluded elements bitwise unchanged through AdamW (moments and decoupled weight decay included)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from deftune.adapters.masks.select import allowed_by_name_and_layer
from deftune.config import Recipe
from deftune.errors import DeftuneError
from deftune.models.arch import num_layers, parse_layers
from deftune.training.callbacks.base import Callback
from deftune.training.fisher import fisher_scores, top_k_mask


def _mask_digest(masks: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(masks):
        digest.update(name.encode())
        digest.update(np.packbits(masks[name].detach().cpu().numpy().reshape(-1)).tobytes())
    return digest.hexdigest()


class GradientMaskCallback(Callback):
    """Restrict training to parameters matching ``modules`` (globs) in ``layers``, then (``fisher_keep``
    > 0) to the top ``fisher_keep`` fraction of their elements by Fisher information.

    On train start: parameters outside the name/layer mask get ``requires_grad=False`` and the optimizer
    is rebuilt, so optimizer state exists only for tensors that can change. The FISH mask is computed over
    ``fisher_batches`` micro-batches; a tensor with no kept element is frozen the same way. For tensors kept
    in part: ``after_backward`` multiplies the gradient by the mask (before clipping, so the clipped norm is
    the masked one) and snapshots the tensor; ``after_optimizer_step`` writes the masked-out elements back
    from the snapshot. AdamW state still exists for the whole of such a tensor.

    Checkpoints: the FISH mask is not stored; resume recomputes it from the same initial weights and
    micro-batches (``on_train_start`` runs before the checkpoint is loaded) and ``load_state_dict`` checks
    the recomputed mask against the checkpoint's SHA-256 digest, refusing to continue on a mismatch.
    """

    name = "gradient_mask"

    def __init__(self, modules: list[str] = (), layers=None, fisher_keep: float = 0.0, fisher_batches: int = 8,
                 seed: int = 0, layers_spec=None):
        self.patterns = list(modules)
        self.layers = None if layers is None else set(layers)
        self.layers_spec = layers_spec
        self.fisher_keep = fisher_keep
        self.fisher_batches = fisher_batches
        self.seed = seed
        self.fisher_masks: dict[str, torch.Tensor] = {}  # every scored tensor's element mask
        self.fisher_total = 0
        self.fisher_kept = 0
        self.fisher_digest = ""
        self._partial: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
        self._snapshots: dict[str, torch.Tensor] = {}

    # -- set-up ----------------------------------------------------------------------------------
    def _describe(self) -> str:
        parts = []
        if self.patterns:
            parts.append(f"mask.modules={self.patterns}")
        if self.layers is not None:
            parts.append(f"mask.layers={self.layers_spec!r}")
        return " and ".join(parts) or "the mask"

    def _apply_name_layer_mask(self, model: nn.Module, trainable) -> dict[str, nn.Parameter]:
        # Trainable now or later (progressive unfreezing may have frozen later stages' tensors already).
        before = trainable.trainable_now_or_later(model)
        for name, p in model.named_parameters():
            if not allowed_by_name_and_layer(name, self.patterns, self.layers):
                trainable.freeze_by_mask(name, p)
        allowed = {n: p for n, p in before.items() if trainable.may_train(n)}
        if not allowed:
            sample = ", ".join(list(before)[:4]) or "none"
            raise DeftuneError(
                f"{self._describe()} leave no trainable parameter. Trainable before the mask "
                f"({len(before)} tensors), e.g.: {sample}. Patterns are globs over full parameter names, "
                "e.g. '*.self_attn.*' or '*.mlp.*'."
            )
        return allowed

    def _apply_fisher_mask(self, trainer, params: dict[str, nn.Parameter]) -> None:
        batches = (trainer.micro_batch(i) for i in range(self.fisher_batches))
        # Tensors of later stages are scored too: the mask is fixed for the whole run.
        waiting = [p for p in params.values() if not p.requires_grad]
        for p in waiting:
            p.requires_grad_(True)
        try:
            scores = fisher_scores(trainer.model, params, batches, trainer.device)
        finally:
            for p in waiting:
                p.requires_grad_(False)
        names = list(params)
        flat = torch.cat([scores[n].reshape(-1).cpu() for n in names])
        self.fisher_total = flat.numel()
        self.fisher_kept = int(round(self.fisher_keep * self.fisher_total))
        if self.fisher_kept == 0:
            raise DeftuneError(f"mask.fisher_keep={self.fisher_keep} keeps no element of "
                               f"{self.fisher_total:,} trainable ones; raise it")
        keep = top_k_mask(flat, self.fisher_kept, self.seed)
        offset = 0
        for name in names:
            p = params[name]
            m = keep[offset: offset + p.numel()].reshape(p.shape)
            offset += p.numel()
            self.fisher_masks[name] = m.to(p.device)
        self.fisher_digest = _mask_digest(self.fisher_masks)
        for name in names:
            p, m = params[name], self.fisher_masks[name]
            if not bool(m.any()):
                trainer.trainable.freeze_by_mask(name, p)
            elif not bool(m.all()):
                self._partial[name] = (p, m)

    def on_train_start(self, trainer) -> None:
        allowed = self._apply_name_layer_mask(trainer.model, trainer.trainable)
        before = sum(p.numel() for p in allowed.values())
        note = f"Gradient mask: {before:,} elements in {len(allowed)} tensors may change"
        if self.fisher_keep > 0:
            self._apply_fisher_mask(trainer, allowed)
            frozen = sum(1 for p in allowed.values() if not p.requires_grad)
            note += (f"; FISH mask keeps {self.fisher_kept:,} of {self.fisher_total:,} "
                     f"({100 * self.fisher_keep:g}%), {frozen} tensors left with none")
        trainer.rebuild_optimizer()
        trainer.say(note)
        trainer.log({"step": trainer.step, "event": "gradient_mask", "tensors": len(allowed),
                      "elements": before, "fisher_kept": self.fisher_kept, "fisher_total": self.fisher_total})

    # -- per step --------------------------------------------------------------------------------
    @torch.no_grad()
    def after_backward(self, trainer) -> None:
        self._snapshots = {}
        for name, (p, m) in self._partial.items():
            if p.grad is None:
                continue
            p.grad.mul_(m)
            self._snapshots[name] = p.detach().clone()

    @torch.no_grad()
    def after_optimizer_step(self, trainer) -> None:
        for name, saved in self._snapshots.items():
            p, m = self._partial[name]
            p.copy_(torch.where(m, p, saved))
        self._snapshots = {}

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if not self.fisher_digest:
            return {}
        return {"fisher_keep": self.fisher_keep, "fisher_kept": self.fisher_kept,
                "fisher_total": self.fisher_total, "fisher_sha256": self.fisher_digest}

    def load_state_dict(self, state: dict, trainer) -> None:
        saved = state.get("fisher_sha256", "")
        if saved == self.fisher_digest:
            return
        if not saved or not self.fisher_digest:
            raise DeftuneError(
                "The checkpoint was made with another mask.fisher_keep setting "
                f"({state.get('fisher_keep', 0)} there, {self.fisher_keep} now); resume with the same recipe"
            )
        raise DeftuneError(
            f"The FISH mask recomputed on resume ({self.fisher_kept:,} of {self.fisher_total:,} kept) differs "
            f"from the checkpoint's ({state.get('fisher_kept')} of {state.get('fisher_total')}): the Fisher "
            "pass must see the same model, adapters, data, seed and device as the original run"
        )


def from_recipe(recipe: Recipe, model: nn.Module) -> GradientMaskCallback | None:
    """The callback for ``recipe.mask``, or None when the recipe asks for no mask."""
    m = recipe.mask
    if 0 < m.fisher_keep < 1 and recipe.adapter.ranks:
        raise DeftuneError("mask.fisher_keep cannot be combined with adapter.ranks: dynamic rank resizes the "
                           "adapters, and the FISH mask is fixed per element of their initial shapes")
    layers_on = m.layers not in (None, "all")
    if not m.modules and not layers_on and not 0 < m.fisher_keep < 1:
        return None
    layers = None
    if layers_on:
        try:
            layers = parse_layers(m.layers, num_layers(model))
        except ValueError as exc:
            raise DeftuneError(f"mask.layers: {exc}") from exc
    patterns = [m.modules] if isinstance(m.modules, str) else [str(p) for p in m.modules]
    keep = m.fisher_keep if 0 < m.fisher_keep < 1 else 0.0
    return GradientMaskCallback(patterns, layers, keep, m.fisher_batches, seed=recipe.train.seed,
                                layers_spec=m.layers)
