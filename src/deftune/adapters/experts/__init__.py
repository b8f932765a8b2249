"""Expert-level tuning of Mixture-of-Experts models: ESFT and expert-LoRA (see ``layer.py`` for the
method and paper), ESFT's expert scoring (``select.py``) and the compact save formats (``model.py``).

The two recipe methods:

* ``esft``: full update of the selected experts only (float32 master copies of their slices), routers
  frozen unless ``experts.train_router``; optionally attention / shared experts in full (``experts.also``).
* ``expert-lora``: LoRA on the selected experts only, plus LoRA on attention / shared experts when
  ``experts.also`` asks (those are ordinary LoRALinear modules, saved in PEFT's format).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from deftune.adapters.experts.layer import ExpertSubset, grouped_linear
from deftune.adapters.experts.model import (
    ADAPTER_META,
    PATCH_META,
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
from deftune.errors import DeftuneError
from deftune.models.moe import require_moe

EXPERT_METHODS = ("esft", "expert-lora")

__all__ = [
    "EXPERT_METHODS",
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
    "load_result",
    "prepare",
    "resolve_selection",
    "routing_stats",
    "save_esft_patch",
    "save_expert_adapter",
    "save_result",
    "select_experts",
    "top_p_experts",
    "unwrap_experts",
]


def _also(recipe) -> set[str]:
    return {p.strip() for p in recipe.experts.also.split("+") if p.strip()}


def _extra_linear_names(model: nn.Module, parts: set[str], blocks) -> list[str]:
    """Full names of the attention projections / shared-expert linears that ``experts.also`` adds."""
    from deftune.models.arch import linear_sites

    names = []
    shared_prefixes = tuple(f"{b.shared_name}." for b in blocks if b.shared_name)
    if "shared" in parts and not shared_prefixes:
        raise DeftuneError(f"experts.also: shared: {type(model).__name__} has no shared experts")
    for site in linear_sites(model):
        if "attention" in parts and site.role == "attention":
            names.append(site.name)
        elif "shared" in parts and site.name.startswith(shared_prefixes):
            names.append(site.name)
    return names


def prepare(recipe, model: nn.Module, device) -> dict:
    """Freeze ``model`` and make the selected experts (and ``experts.also``) trainable, the ESFT or the
    expert-LoRA way. Returns a spec: the selection and, for expert-lora extras, the LoraSpec."""
    from deftune.adapters.lora.model import attach_lora, freeze_all

    method = recipe.method
    blocks = require_moe(model, f"method {method}")
    selection = resolve_selection(recipe.experts.domains, recipe.experts.select, blocks)
    parts = _also(recipe)
    extra = _extra_linear_names(model, parts, blocks) if parts else []
    a = recipe.adapter
    lora_spec = None
    freeze_all(model)
    if method == "expert-lora" and extra:
        lora_spec = attach_lora(model, extra, "all", a.rank, a.alpha, a.dropout, a.rslora)
    mode = "esft" if method == "esft" else "lora"
    attach_experts(model, selection, mode, a.rank, a.alpha, a.dropout, a.rslora)
    if method == "esft":
        full = [model.get_submodule(n) for n in extra]
        if recipe.experts.train_router:
            full += [b.router for b in blocks]
        for module in full:
            for param in module.parameters():
                # float32 master weights, as for method full: bf16 cannot absorb small updates.
                param.data = param.data.float()
                param.requires_grad_(True)
    model.to(device)
    chosen = sum(len(v) for v in selection.values())
    total = sum(b.num_experts for b in blocks)
    print(
        f"Experts: {chosen} of {total} routed experts in {len(selection)} MoE layers "
        f"({method}{', also ' + '+'.join(sorted(parts)) if parts else ''})"
    )
    return {"selection": selection, "lora": lora_spec}


def save_result(model: nn.Module, spec: dict, folder: Path, base_model: str) -> Path:
    """ESFT: sparse patch. expert-LoRA: expert adapter (+ PEFT adapter for attention/shared LoRA)."""
    if any(m.mode == "esft" for m in expert_subsets(model).values()):
        return save_esft_patch(model, folder, base_model)
    if spec.get("lora") is not None:
        from deftune.adapters.peft_format import save_adapter

        save_adapter(model, spec["lora"], folder, base_model)
    return save_expert_adapter(model, folder, base_model)


def load_result(model: nn.Module, folder: Path) -> str:
    """Apply what ``save_result`` wrote in ``folder`` to a freshly loaded base model. Returns the kind."""
    if (folder / PATCH_META).is_file():
        apply_esft_patch(model, folder)
        return "esft"
    if (folder / ADAPTER_META).is_file():
        if (folder / "adapter_config.json").is_file():
            from deftune.adapters.peft_format import load_adapter

            load_adapter(model, folder)
        load_expert_adapter(model, folder)
        return "expert-lora"
    raise DeftuneError(
        f"{folder}: holds neither an ESFT patch ({PATCH_META}) nor an expert adapter ({ADAPTER_META})"
    )


def score_domain(
    model_path: str,
    data: str,
    top_p: float = 0.2,
    score: str = "token",
    out: str = "",
    heatmap: str = "",
    device: str = "auto",
    max_records: int = 0,
    batch_size: int = 8,
    overrides: list[str] | tuple = (),
) -> dict:
    """``deftune experts``: ESFT's scores of every routed expert on ``data`` and the top-p selection.

    The records are rendered with the recipe's prompt template (``data.template``, seed by default) and
    every non-pad token of prompt and response counts, as in ESFT. Writes the selection JSON (``out``)
    and a PNG heatmap (``heatmap``; default: beside ``out``) and returns a summary dict.
    """
    from deftune.api import resolve_device
    from deftune.config import load_recipe
    from deftune.data import batches, read_records, to_samples, tokenize_samples
    from deftune.data.tokenize import ensure_pad_token
    from deftune.models.load import load_model

    if score not in ("gate", "token"):
        raise DeftuneError(f"--score must be gate or token, got {score!r}")
    if not 0 < top_p <= 1:
        raise DeftuneError(f"--top-p must be in (0, 1], got {top_p}")
    recipe = load_recipe(None, [f"model.path={model_path}", *overrides])
    # The data first: a wrong path or a malformed record should fail before the model loads.
    samples = to_samples(read_records(data), recipe.data.format)
    if max_records > 0:
        samples = samples[:max_records]
    dev = resolve_device(device)
    model, tokenizer, source = load_model(recipe.model, dev)
    ensure_pad_token(tokenizer)
    blocks = require_moe(model, "deftune experts")
    examples, stats = tokenize_samples(
        samples, tokenizer, recipe.data.template, recipe.data.max_length, recipe.data.system_prompt
    )
    if not examples:
        raise DeftuneError(f"{data}: no record fits data.max_length={recipe.data.max_length}")
    rows = batches(examples, batch_size, tokenizer.pad_token_id, seed=0, epoch=0, shuffle=False)
    routing = routing_stats(model, rows, blocks)
    selection = select_experts(routing, score, top_p)
    table = format_table(routing, score, selection)
    result = {
        "model": source.name,
        "records": len(examples),
        "tokens": routing.tokens,
        "score": score,
        "top_p": top_p,
        "selection": selection,
        "table": table,
        "selected": sum(len(v) for v in selection.values()),
        "experts": sum(b.num_experts for b in blocks),
    }
    if out:
        from deftune.adapters.experts.select import write_selection

        result["out"] = str(write_selection(Path(out), selection, routing, score, top_p, source.name, data))
    png = Path(heatmap) if heatmap else (Path(out).with_suffix(".png") if out else None)
    if png is not None:
        try:
            from deftune.adapters.experts.select import plot_heatmap

            result["heatmap"] = str(plot_heatmap(routing, score, png, selection))
        except ImportError:
            result["heatmap_note"] = "no heatmap: matplotlib is missing (pip install 'deftune[monitor]')"
    return result
