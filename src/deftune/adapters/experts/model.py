"""Attach expert subsets to an MoE model, save them compactly, load them back, merge them.

Two files formats, since PEFT cannot express "LoRA on experts 3 and 7 of a fused [E, 2I, H] tensor":

* ESFT sparse patch (``esft_patch.safetensors`` + ``esft_patch.json``): the changed slices only —
  ``<layer>.mlp.experts.gate_up_proj`` holds [k, 2I, H] for the ids listed in the JSON — plus any other
  tensor trained in full (router, shared experts, attention when asked). ``apply_esft_patch`` writes them
  into a base model.
* expert-LoRA (``expert_adapter.safetensors`` + ``expert_adapter.json``): per-expert A/B with the expert
  ids, rank and alpha; LoRA on attention / shared experts, when asked, sits beside it in PEFT's format.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deftune.adapters.experts.layer import ExpertSubset
from deftune.adapters.experts.select import Selection
from deftune.errors import DeftuneError
from deftune.models.moe import MoeBlock, moe_blocks
from deftune.models.surgery import replace_module

PATCH_FILE = "esft_patch.safetensors"
PATCH_META = "esft_patch.json"
ADAPTER_FILE = "expert_adapter.safetensors"
ADAPTER_META = "expert_adapter.json"


def attach_experts(
    model: nn.Module,
    selection: Selection,
    mode: str,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    rslora: bool = False,
) -> dict[int, str]:
    """Wrap the experts of every layer in ``selection`` in an ExpertSubset. Returns {layer: module name}."""
    blocks = {b.layer: b for b in moe_blocks(model)}
    names = {}
    for layer, ids in sorted(selection.items()):
        block = blocks.get(layer)
        if block is None:
            raise DeftuneError(f"layer {layer} has no routed experts")
        if isinstance(block.experts, ExpertSubset):
            raise DeftuneError(f"layer {layer}: experts already wrapped")
        name = f"{block.name}.experts"
        replace_module(model, name, ExpertSubset(block.experts, ids, mode, rank, alpha, dropout, rslora))
        names[layer] = name
    return names


def expert_subsets(model: nn.Module) -> dict[str, ExpertSubset]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertSubset)}


def current_selection(model: nn.Module) -> Selection:
    out = {}
    for block in moe_blocks(model):
        if isinstance(block.experts, ExpertSubset):
            out[block.layer] = list(block.experts.selected_ids)
    return out


def unwrap_experts(model: nn.Module, merge: bool = True) -> int:
    """Put the original experts modules back (with the tuned experts written in when ``merge``)."""
    subsets = expert_subsets(model)
    for name, module in subsets.items():
        replace_module(model, name, module.unwrap(merge))
    return len(subsets)


def _save(tensors: dict[str, torch.Tensor], meta: dict, folder: Path, file: str, meta_file: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
        str(folder / file),
        metadata={"format": "pt"},
    )
    (folder / meta_file).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return folder


def _selection_json(model: nn.Module) -> dict:
    return {str(k): v for k, v in current_selection(model).items()}


def save_esft_patch(model: nn.Module, folder: Path, base_model: str) -> Path:
    """Save the ESFT result: the selected experts' slices and every other trained tensor (full)."""
    tensors, sliced, full = {}, {}, []
    subset_params = set()
    for name, module in expert_subsets(model).items():
        if module.mode != "esft":
            raise DeftuneError(f"{name} carries expert-LoRA, not an ESFT update")
        gu, dn = module.merged_weights()
        tensors[f"{name}.gate_up_proj"], tensors[f"{name}.down_proj"] = gu, dn
        sliced[f"{name}.gate_up_proj"] = sliced[f"{name}.down_proj"] = module.selected_ids
        subset_params.update(id(p) for p in module.parameters())
    dtype = next(iter(expert_subsets(model).values())).gate_up_proj.dtype if sliced else None
    for pname, param in model.named_parameters():
        if param.requires_grad and id(param) not in subset_params:
            # Trained in full (router / shared experts / attention when asked), stored in the base dtype.
            tensors[pname] = param.detach().to(dtype or param.dtype)
            full.append(pname)
    meta = {
        "format": "deftune-esft-patch",
        "version": 1,
        "base_model": base_model,
        "selection": _selection_json(model),
        "sliced": sliced,
        "full": full,
    }
    return _save(tensors, meta, folder, PATCH_FILE, PATCH_META)


def _read(folder: Path, file: str, meta_file: str, kind: str) -> tuple[dict, dict]:
    if not (folder / meta_file).is_file() or not (folder / file).is_file():
        raise DeftuneError(f"{folder}: no {kind} here (expected {file} and {meta_file})")
    try:
        meta = json.loads((folder / meta_file).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DeftuneError(f"{folder / meta_file}: not valid JSON: {exc}") from exc
    return meta, load_file(str(folder / file))


@torch.no_grad()
def apply_esft_patch(model: nn.Module, folder: Path) -> int:
    """Write an ESFT patch into ``model``'s weights in place. Returns the number of tensors written."""
    meta, tensors = _read(folder, PATCH_FILE, PATCH_META, "ESFT patch")
    params = dict(model.named_parameters())
    written = 0
    for name, tensor in tensors.items():
        if name not in params:
            raise DeftuneError(
                f"{folder / PATCH_FILE}: {name} is not a parameter of {type(model).__name__}: "
                "was the patch made for another base model?"
            )
        target = params[name]
        if name in meta["sliced"]:
            ids = torch.tensor(meta["sliced"][name], dtype=torch.long, device=target.device)
            if tuple(tensor.shape) != (len(ids), *target.shape[1:]):
                raise DeftuneError(
                    f"{folder / PATCH_FILE}: {name} has shape {tuple(tensor.shape)}, the base "
                    f"model's experts need ({len(ids)}, {', '.join(map(str, target.shape[1:]))})"
                )
            target.data[ids] = tensor.to(target.device, target.dtype)
        else:
            if tensor.shape != target.shape:
                raise DeftuneError(
                    f"{folder / PATCH_FILE}: {name} shape {tuple(tensor.shape)} != base {tuple(target.shape)}"
                )
            target.data.copy_(tensor.to(target.device, target.dtype))
        written += 1
    return written


def save_expert_adapter(model: nn.Module, folder: Path, base_model: str) -> Path:
    subsets = expert_subsets(model)
    if not subsets:
        raise DeftuneError("no expert-LoRA modules to save")
    first = next(iter(subsets.values()))
    tensors = {}
    for name, module in subsets.items():
        if module.mode != "lora":
            raise DeftuneError(f"{name} is an ESFT subset, not expert-LoRA")
        for part in ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B"):
            tensors[f"{name}.{part}"] = getattr(module, part)
    meta = {
        "format": "deftune-expert-lora",
        "version": 1,
        "base_model": base_model,
        "rank": first.rank,
        "alpha": first.alpha,
        "rslora": first.rslora,
        "selection": _selection_json(model),
        "modules": sorted(subsets),
    }
    return _save(tensors, meta, folder, ADAPTER_FILE, ADAPTER_META)


@torch.no_grad()
def load_expert_adapter(model: nn.Module, folder: Path) -> int:
    """Attach expert-LoRA as saved in ``folder`` and load its weights. Returns the number of layers."""
    meta, tensors = _read(folder, ADAPTER_FILE, ADAPTER_META, "expert adapter")
    selection = {int(k): v for k, v in meta["selection"].items()}
    names = attach_experts(
        model, selection, "lora", meta["rank"], meta["alpha"], 0.0, meta.get("rslora", False)
    )
    for name in names.values():
        module = model.get_submodule(name)
        for part in ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B"):
            key = f"{name}.{part}"
            if key not in tensors:
                raise DeftuneError(f"{folder / ADAPTER_FILE}: missing {key}")
            getattr(module, part).data.copy_(tensors[key])
    return len(names)


def block_of(model: nn.Module, layer: int) -> MoeBlock:
    for b in moe_blocks(model):
        if b.layer == layer:
            return b
    raise DeftuneError(f"layer {layer} has no routed experts")
