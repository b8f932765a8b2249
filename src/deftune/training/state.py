"""Training-time state that several features share: which parameters may change, and from when.

Progressive unfreezing freezes the tensors of later stages until their stage starts; a gradient mask
freezes tensors for the whole run. Each must see the other's decisions whichever runs first, so both
record them here, by parameter name (names stay valid when a feature replaces a tensor, e.g. dynamic
rank resizing an adapter), instead of as attributes on the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class TrainableState:
    """``mask_frozen``: names a gradient mask froze for the whole run (never unfrozen again).
    ``stage_pending``: names frozen now that a later progressive-unfreezing stage will train."""

    mask_frozen: set[str] = field(default_factory=set)
    stage_pending: set[str] = field(default_factory=set)

    def freeze_by_mask(self, name: str, param: nn.Parameter) -> None:
        self.mask_frozen.add(name)
        param.requires_grad_(False)

    def may_train(self, name: str) -> bool:
        """False once a mask froze ``name``."""
        return name not in self.mask_frozen

    def trainable_now_or_later(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Parameters that train now or wait for a later stage, minus those a mask froze."""
        return {n: p for n, p in model.named_parameters()
                if (p.requires_grad or n in self.stage_pending) and n not in self.mask_frozen}

    def set_stage(self, name: str, param: nn.Parameter, on: bool) -> None:
        """Train ``name`` in the current stage (``on``) or hold it for a later one."""
        param.requires_grad_(on and name not in self.mask_frozen)
        if on:
            self.stage_pending.discard(name)
        else:
            self.stage_pending.add(name)
