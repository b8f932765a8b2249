"""Dynamic-rank LoRA: AdaLoRA-style importance scores decide each module's rank, adapters are resized.

The scores (``importance``) and the budget split (``allocate``) live here; the training-time callback that
uses them is :mod:`deftune.training.callbacks.dynamic_rank`.
"""

from deftune.adapters.dynamic_rank.allocate import (
    adapter_param_count,
    allocate_ranks,
    format_ranks,
    initial_rank,
    make_budget,
)
from deftune.adapters.dynamic_rank.importance import ComponentImportance, gate_sensitivity

__all__ = [
    "initial_rank", "format_ranks", "allocate_ranks", "make_budget", "adapter_param_count",
    "ComponentImportance", "gate_sensitivity",
]
