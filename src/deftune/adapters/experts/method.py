"""Methods ``esft`` and ``expert-lora``: tune only the routed experts that matter for a domain.

ESFT (Wang et al. 2024, "Let the Expert Stick to His Last: Expert-Specialized Fine-Tuning for Sparse
Architectural Large Language Models", arXiv:2407.01906): score every routed expert on the domain's data,
keep per layer the top experts whose scores sum to p, and update only them:

    W_e <- W_e - lr * AdamW(dL/dW_e)   for e in the selection;  routers and other experts frozen

``expert-lora`` trains LoRA on the selected experts instead (h_e = W_e x + s B_e A_e x, Hu et al. 2021,
arXiv:2106.09685). ``experts.also`` adds attention / shared experts (full update with esft, LoRA with
expert-lora). Saved compactly: ESFT as a sparse patch of the changed slices (``esft/``), expert-LoRA as an
expert adapter plus a PEFT adapter for the extra LoRA (``expert-lora/``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deftune.adapters.base import Method, train_in_float32
from deftune.adapters.experts.model import (
    ADAPTER_META,
    PATCH_META,
    apply_esft_patch,
    attach_experts,
    expert_subsets,
    load_expert_adapter,
    save_esft_patch,
    save_expert_adapter,
    unwrap_experts,
)
from deftune.adapters.experts.select import resolve_selection
from deftune.adapters.lora.model import attach_lora, freeze_all, merge_lora
from deftune.adapters.peft_format import load_adapter, save_adapter
from deftune.errors import DeftuneError
from deftune.models.arch import linear_sites
from deftune.models.moe import require_moe


def _also(recipe) -> set[str]:
    return {p.strip() for p in recipe.experts.also.split("+") if p.strip()}


def _extra_linear_names(model: nn.Module, parts: set[str], blocks) -> list[str]:
    """Full names of the attention projections / shared-expert linears that ``experts.also`` adds."""
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
        train_in_float32(full)
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
        save_adapter(model, spec["lora"], folder, base_model)
    return save_expert_adapter(model, folder, base_model)


def load_result(model: nn.Module, folder: Path) -> str:
    """Apply what ``save_result`` wrote in ``folder`` to a freshly loaded base model. Returns the kind."""
    if (folder / PATCH_META).is_file():
        apply_esft_patch(model, folder)
        return "esft"
    if (folder / ADAPTER_META).is_file():
        if (folder / "adapter_config.json").is_file():
            load_adapter(model, folder)
        load_expert_adapter(model, folder)
        return "expert-lora"
    raise DeftuneError(
        f"{folder}: holds neither an ESFT patch ({PATCH_META}) nor an expert adapter ({ADAPTER_META})"
    )




class _ExpertMethod(Method):
    def check(self, recipe) -> None:
        a = recipe.adapter
        if a.ranks or a.stages:
            raise DeftuneError(f"adapter.ranks / adapter.stages do not apply to method {self.name}")
        # Checked when the recipe is read, before any model is loaded: a typo should not cost a model load.
        sel, domains = recipe.experts.select, recipe.experts.domains
        if not sel:
            raise DeftuneError(f"method {self.name} needs experts.select: a domain of experts.domains "
                               f"({', '.join(map(str, domains)) or 'none defined'}) or a selection file "
                               "from `deftune experts`")
        if sel not in domains and not sel.endswith(".json") and not Path(sel).is_file():
            raise DeftuneError(f"experts.select: {sel!r} is neither a domain of experts.domains "
                               f"({', '.join(map(str, domains)) or 'none defined'}) nor a selection file")

    def attach(self, recipe, model: nn.Module, device: torch.device):
        return prepare(recipe, model, device)

    def save(self, model: nn.Module, spec, folder: Path, base_model: str) -> None:
        save_result(model, spec, folder, base_model)

    def apply_saved(self, model: nn.Module, folder: Path) -> None:
        load_result(model, folder)


class ESFT(_ExpertMethod):
    name = "esft"
    output = "esft"

    def merge(self, model: nn.Module) -> int:
        # The patch was written into the base weights on load; this only unwraps the expert modules.
        return unwrap_experts(model, merge=True) + 1


class ExpertLoRA(_ExpertMethod):
    name = "expert-lora"
    output = "expert-lora"
    quantized_base = True

    def check(self, recipe) -> None:
        if recipe.experts.train_router:
            raise DeftuneError("experts.train_router applies to method esft (LoRA does not wrap routers)")
        super().check(recipe)

    def merge(self, model: nn.Module) -> int:
        # LoRA on attention / shared experts, then s * B_e A_e folded into each selected expert.
        return merge_lora(model) + unwrap_experts(model, merge=True)
