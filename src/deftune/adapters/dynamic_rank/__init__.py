"""Dynamic-rank LoRA: AdaLoRA-style importance scores decide each module's rank, adapters are resized.

``from_recipe(recipe, model)`` gives the training callback for ``adapter.ranks`` (None when empty).
"""

from deftune.adapters.dynamic_rank.allocate import adapter_param_count, allocate_ranks, make_budget
from deftune.adapters.dynamic_rank.callback import (
    DynamicRankCallback,
    format_ranks,
    from_recipe,
    initial_rank,
    window_steps,
)
from deftune.adapters.dynamic_rank.importance import ComponentImportance, gate_sensitivity

__all__ = [
    "DynamicRankCallback", "from_recipe", "initial_rank", "format_ranks", "window_steps", "allocate_ranks",
    "make_budget", "adapter_param_count", "ComponentImportance", "gate_sensitivity",
]
