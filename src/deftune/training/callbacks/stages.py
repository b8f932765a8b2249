"""Progressive unfreezing: train a growing set of modules, stage by stage.

ULMFiT-style gradual unfreezing (Howard & Ruder 2018, "Universal Language Model Fine-tuning for Text
Classification", arXiv:1801.06146), applied to adapters (or, with method full, to module weights):

    adapter.stages: [{targets: attention, steps: 200}, {targets: attention+mlp}]

Stage k trains the union of the modules of stages 0..k (each stage may name its own ``layers``; default
``adapter.layers``). It starts when the optimizer step reaches s_0 + ... + s_{k-1}; its new parameters
join the optimizer at that step with their own linear LR warm-up over ``adapter.stage_warmup`` steps,
while the parameters already training keep their AdamW moments. Adapters must exist for every stage
from the start: attach them with ``stage_targets_union``.
"""

from __future__ import annotations

from torch import nn

from deftune.adapters.stages import stage_sites as _stage_sites
from deftune.adapters.stages import stage_targets_union
from deftune.config import Recipe
from deftune.errors import DeftuneError
from deftune.training.callbacks.base import Callback

__all__ = ["ProgressiveUnfreezing", "from_recipe", "stage_targets_union"]

def _unwrapped_name(name: str) -> str:
    return name[len("module."):] if name.startswith("module.") else name


class ProgressiveUnfreezing(Callback):
    """Freeze all but stage 0's modules at train start; unfreeze each next stage at its boundary step.

    Only parameters trainable when training starts take part; those in no stage stay frozen for the whole
    run. A tensor a gradient mask froze is never unfrozen, whichever callback runs first; tensors waiting for
    a later stage are recorded as such in the trainer's ``trainable`` state, so a mask running after this
    callback still sees them.
    """

    name = "stages"

    def __init__(self, stages: list[dict], default_layers="all", stage_warmup: int = 0):
        self.stages = [dict(s) for s in stages]
        self.default_layers = default_layers
        self.stage_warmup = stage_warmup
        self.stage = 0
        self.boundaries: list[int] = []  # step at which stage k+1 starts
        total = 0
        for stage in self.stages[:-1]:
            total += int(stage["steps"])
            self.boundaries.append(total)
        self._stage_params: list[list[str]] = []  # parameter names each stage adds
        self._params: dict[str, nn.Parameter] = {}
        self._model: nn.Module | None = None
        self._trainable = None

    def _stage_at(self, step: int) -> int:
        return sum(1 for b in self.boundaries if step >= b)

    def _trainable_names(self, stage: int) -> set[str]:
        return {n for k in range(stage + 1) for n in self._stage_params[k]}

    def _apply(self, stage: int) -> None:
        on = self._trainable_names(stage)
        # Looked up by name each time: a callback may have replaced a tensor (dynamic rank resizes adapters).
        self._params = {n: p for n, p in self._model.named_parameters() if n in self._params}
        for name, p in self._params.items():
            self._trainable.set_stage(name, p, name in on)

    def on_train_start(self, trainer) -> None:
        model = self._model = trainer.model
        self._trainable = trainer.trainable
        base = getattr(model, "module", model)
        self._params = {n: p for n, p in model.named_parameters()
                        if p.requires_grad and self._trainable.may_train(n)}
        claimed: set[str] = set()
        self._stage_params = []
        for i, stage in enumerate(self.stages):
            prefixes = tuple(s.name + "." for s in _stage_sites(base, stage, self.default_layers, i))
            added = [n for n in self._params if n not in claimed and _unwrapped_name(n).startswith(prefixes)]
            claimed.update(added)
            self._stage_params.append(added)
        if not self._stage_params[0]:
            raise DeftuneError(
                f"adapter.stages[0] (targets {self.stages[0]['targets']!r}) selects no trainable parameter: "
                "attach adapters with stage_targets_union(adapter.stages, adapter.layers)"
            )
        unstaged = len(self._params) - len(claimed)
        if unstaged:
            trainer.say(f"Progressive unfreezing: {unstaged} trainable tensors belong to no stage "
                         "and stay frozen")
        self.stage = self._stage_at(trainer.step)
        self._apply(self.stage)
        trainer.rebuild_optimizer()

    def on_step_end(self, trainer) -> None:
        while self.stage < len(self.boundaries) and trainer.step >= self.boundaries[self.stage]:
            self._advance(trainer)

    def _advance(self, trainer) -> None:
        self.stage += 1
        self._apply(self.stage)
        new = [n for n in self._stage_params[self.stage] if self._params[n].requires_grad]
        trainer.rebuild_optimizer(new_params={n: trainer.step for n in new}, stage_warmup=self.stage_warmup)
        stage = self.stages[self.stage]
        count = sum(self._params[n].numel() for n in new)
        layers = stage.get("layers", self.default_layers)
        trainer.log({"step": trainer.step, "event": "stage", "stage": self.stage, "targets": stage["targets"],
                      "layers": layers, "new_params": count, "new_tensors": len(new)})
        trainer.say(f"step {trainer.step}: stage {self.stage + 1}/{len(self.stages)} adds "
                     f"{stage['targets']} on layers {layers}: {count:,} parameters in {len(new)} tensors "
                     f"join training (LR warm-up over {self.stage_warmup} steps)")

    def state_dict(self) -> dict:
        return {"stage": self.stage}

    def load_state_dict(self, state: dict, trainer) -> None:
        if "stage" not in state:
            raise DeftuneError("The checkpoint has no progressive-unfreezing stage: was it made without "
                               "adapter.stages? Resume with the same recipe")
        stage = int(state["stage"])
        if not 0 <= stage < len(self.stages):
            raise DeftuneError(f"The checkpoint is at stage {stage}, this recipe has {len(self.stages)} stages")
        self.stage = stage
        self._apply(stage)


def from_recipe(recipe: Recipe, model: nn.Module) -> ProgressiveUnfreezing | None:
    """The callback for ``recipe.adapter.stages``, or None when there are none. Checks every stage's
    targets and layers against ``model`` now, so a typo fails before training."""
    a = recipe.adapter
    if not a.stages:
        return None
    base = getattr(model, "module", model)
    for i, stage in enumerate(a.stages):
        _stage_sites(base, stage, a.layers, i)
    return ProgressiveUnfreezing(a.stages, a.layers, a.stage_warmup)
