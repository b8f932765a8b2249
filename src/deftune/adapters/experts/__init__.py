"""Expert-level tuning of Mixture-of-Experts models: ESFT and expert-LoRA (see ``layer.py`` for the
method and paper), ESFT's expert scoring (``select.py``) and the compact save formats (``model.py``).

The two recipe methods:

* ``esft``: full update of the selected experts only (float32 master copies of their slices), routers
  frozen unless ``experts.train_router``; optionally attention / shared experts in full (``experts.also``).
* ``expert-lora``: LoRA on the selected experts only, plus LoRA on attention / shared experts when
  ``experts.also`` asks (those are ordinary LoRALinear modules, saved in PEFT's format).
"""

from __future__ import annotations

from deftune.adapters.experts.layer import ExpertSubset, grouped_linear
from deftune.adapters.experts.method import ESFT, ExpertLoRA, prepare
from deftune.adapters.experts.model import (
    apply_esft_patch,
    attach_experts,
    current_selection,
    expert_subsets,
    load_expert_adapter,
    save_esft_patch,
    save_expert_adapter,
    unwrap_experts,
)
from deftune.adapters.experts.select import (
    RoutingStats,
    Selection,
    format_table,
    resolve_selection,
    routing_stats,
    select_experts,
    top_p_experts,
)

__all__ = [
    "ESFT",
    "ExpertLoRA",
    "ExpertSubset",
    "RoutingStats",
    "Selection",
    "apply_esft_patch",
    "attach_experts",
    "current_selection",
    "expert_subsets",
    "format_table",
    "grouped_linear",
    "load_expert_adapter",
    "prepare",
    "resolve_selection",
    "routing_stats",
    "save_esft_patch",
    "save_expert_adapter",
    "select_experts",
    "top_p_experts",
    "unwrap_experts",
]
