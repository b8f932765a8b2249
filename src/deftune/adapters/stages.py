"""Which modules each progressive-unfreezing stage (``adapter.stages``) covers.

Adapters (or, with method full, trainable weights) must exist for every stage from step 0, so methods
attach them on the union of the stages' modules (:func:`stage_targets_union`); the training callback
(:mod:`deftune.training.callbacks.stages`) then decides which of them train when.
"""

from __future__ import annotations

from torch import nn

from deftune.errors import DeftuneError
from deftune.models.arch import select_sites


def _target_tokens(targets) -> list[str]:
    if isinstance(targets, str):
        return [t.strip() for t in targets.split("+") if t.strip()]
    return [str(t) for t in targets]


def stage_targets_union(stages: list[dict], default_layers, model: nn.Module | None = None) -> tuple:
    """``(targets, layers)`` to attach adapters (or unfreeze weights, method full) so that every stage's
    modules exist from step 0; pass them to ``attach_lora`` / ``select_sites``.

    When every stage uses the same layers the result is the union of the stages' targets (a list of
    presets and module names) on those layers. Stages with different layers need ``model``: the result is
    then the exact list of module names, on layers "all".
    """
    if not stages:
        raise DeftuneError("adapter.stages is empty: nothing to take the union of")
    layer_specs = [stage.get("layers", default_layers) for stage in stages]
    if all(spec == layer_specs[0] for spec in layer_specs):
        tokens: list[str] = []
        for stage in stages:
            tokens += [t for t in _target_tokens(stage["targets"]) if t not in tokens]
        return tokens, layer_specs[0]
    if model is None:
        raise DeftuneError("adapter.stages use different layers: stage_targets_union needs the model "
                           "to list the modules")
    names: list[str] = []
    for i, stage in enumerate(stages):
        names += [s.name for s in stage_sites(model, stage, default_layers, i) if s.name not in names]
    return names, "all"


def stage_sites(model: nn.Module, stage: dict, default_layers, index: int):
    try:
        return select_sites(model, stage["targets"], stage.get("layers", default_layers))
    except ValueError as exc:
        raise DeftuneError(f"adapter.stages[{index}]: {exc}") from exc
