"""Save and load LoRA adapters in PEFT's file format.

Files: ``adapter_config.json`` (PEFT's LoraConfig fields) and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``, so
``peft.PeftModel.from_pretrained(base, folder)`` loads a deftune adapter and gives the same logits.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deftune.adapters.lora.layer import LoRALinear
from deftune.adapters.lora.model import LoraSpec, lora_modules, lora_state_dict
from deftune.errors import DeftuneError
from deftune.models.quantize import NF4Linear
from deftune.models.surgery import replace_module

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_config(spec: LoraSpec, base_model_name: str, modules: dict[str, LoRALinear] | None = None) -> dict:
    """PEFT's LoraConfig fields. Modules whose rank or alpha differ from the spec's (dynamic rank) go to
    ``rank_pattern`` / ``alpha_pattern`` under their full path (escaped: PEFT reads keys as regexes)."""
    modules = modules or {}
    names = sorted(modules) if modules else sorted(spec.module_names)
    rank_pattern = {re.escape(n): m.rank for n, m in modules.items() if m.rank != spec.rank}
    alpha_pattern = {re.escape(n): m.alpha for n, m in modules.items() if m.alpha != spec.alpha}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.rslora,
        # Full module paths: PEFT matches a list entry when a module's name ends with it, so the exact
        # layer selection survives the round trip.
        "target_modules": names,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_dora": False,
        "revision": None,
    }


def save_adapter(model: nn.Module, spec: LoraSpec, folder: str | Path, base_model_name: str) -> Path:
    """Write the adapter atomically (temporary files, then rename) and return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        PEFT_PREFIX + key: value.detach().to("cpu", torch.float32).contiguous()
        for key, value in lora_state_dict(model).items()
    }
    tmp_weights = folder / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
    tmp_config = folder / (CONFIG_NAME + ".tmp")
    config = adapter_config(spec, base_model_name, lora_modules(model))
    tmp_config.write_text(json.dumps(config, indent=2), encoding="utf-8")
    os.replace(tmp_weights, folder / WEIGHTS_NAME)
    os.replace(tmp_config, folder / CONFIG_NAME)
    return folder


def read_adapter_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise DeftuneError(f"No {CONFIG_NAME} in {folder}: not a LoRA adapter folder")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise DeftuneError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    return config


def load_adapter(model: nn.Module, folder: str | Path) -> LoraSpec:
    """Attach the LoRA adapter saved in ``folder`` (deftune's or PEFT's own) to ``model``."""
    config = read_adapter_config(folder)
    weights_path = Path(folder) / WEIGHTS_NAME
    if not weights_path.is_file():
        raise DeftuneError(f"No {WEIGHTS_NAME} in {folder}")
    state = load_file(str(weights_path))
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    rslora = bool(config.get("use_rslora", False))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    names = sorted({key[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for key in state if ".lora_A" in key})
    if not names:
        raise DeftuneError(f"{weights_path} holds no lora_A weights")
    for param in model.parameters():
        param.requires_grad_(False)
    existing = lora_modules(model)
    for name in names:
        a = state[f"{PEFT_PREFIX}{name}.lora_A.weight"]
        b = state[f"{PEFT_PREFIX}{name}.lora_B.weight"]
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise DeftuneError(f"Adapter module {name} does not exist in this model (wrong base model?)")
        if name in existing:
            raise DeftuneError(f"{name} already carries a LoRA adapter")
        if not isinstance(base, (nn.Linear, NF4Linear)):  # NF4Linear: a QLoRA base (model.quantize)
            raise DeftuneError(f"Adapter module {name} is a {type(base).__name__}, not a linear layer")
        r = a.shape[0]
        leaf_alpha = _pattern_value(alpha_pattern, name, alpha)
        expected_r = _pattern_value(rank_pattern, name, rank)
        if r != expected_r:
            raise DeftuneError(f"{name}: lora_A has rank {r} but the config says {expected_r}")
        if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
            raise DeftuneError(f"{name}: adapter shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit "
                               f"the base layer ({base.in_features} -> {base.out_features})")
        layer = LoRALinear(base, r, float(leaf_alpha), float(config.get("lora_dropout", 0.0)), rslora)
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
        replace_module(model, name, layer)
    return LoraSpec(rank, alpha, float(config.get("lora_dropout", 0.0)), rslora, names)


def _pattern_value(pattern: dict, name: str, default):
    """PEFT's rule for rank_pattern/alpha_pattern keys: a regex matching the end of the module path."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def is_adapter_folder(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_NAME).is_file()


__all__ = ["save_adapter", "load_adapter", "read_adapter_config", "is_adapter_folder", "LoRALinear"]
