"""Checkpoints that survive a crash, and resume.

A checkpoint is a folder ``checkpoints/step-000120`` holding the trainable tensors and the optimizer
state (safetensors), plus the scheduler, RNG and loop position (JSON). It is written to a temporary
folder and renamed into place, so a crash mid-write never leaves a corrupt latest checkpoint; the
``latest`` file is replaced atomically after the rename. Only the last K are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deftune.errors import DeftuneError

PREFIX = "step-"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer, scheduler, step: int, extra: dict,
                    keep_last: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{PREFIX}{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"param.{n}": t.to("cpu").contiguous() for n, t in trainable_state(model).items()}
    # Optimizer state keyed by parameter *name*, not position, so a checkpoint stays readable if the
    # parameter order changes (e.g. adapters attached in another order).
    opt_state = optimizer.state_dict()
    flat_params = [p for g in optimizer.param_groups for p in g["params"]]
    for index, state in opt_state["state"].items():
        name = names[id(flat_params[index])]
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{name}.{key}"] = value.to("cpu").contiguous().reshape(value.shape)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    save_file(tensors, str(tmp / "state.safetensors"))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt_state["param_groups"]]
    meta = {
        "step": step,
        "param_order": [names[id(p)] for p in flat_params],
        "param_groups": groups,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "python_random": _encode_random_state(random.getstate()),
        **extra,
    }
    _write_json(tmp / "meta.json", meta)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_json(root / "latest.json", {"checkpoint": final.name, "step": step})
    _prune(root, keep_last)
    return final


def _encode_random_state(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_random_state(data) -> tuple:
    version, internal, gauss = data
    return version, tuple(internal), gauss


def _prune(root: Path, keep_last: int) -> None:
    checkpoints = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))
    for old in checkpoints[: max(0, len(checkpoints) - max(1, keep_last))]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """``resume``: "" (none), "auto" (the latest under run_dir, if any) or a checkpoint folder."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / "meta.json").is_file():
            raise DeftuneError(f"train.resume={resume!r} is not a checkpoint folder (no meta.json)")
        return path
    root = Path(run_dir) / "checkpoints"
    latest = root / "latest.json"
    if latest.is_file():
        name = json.loads(latest.read_text(encoding="utf-8"))["checkpoint"]
        if (root / name / "meta.json").is_file():
            return root / name
    # Fall back to the newest complete folder (latest.json lost or pointing at a pruned one).
    candidates = sorted(p for p in root.glob(f"{PREFIX}*") if (p / "meta.json").is_file()) if root.is_dir() else []
    return candidates[-1] if candidates else None


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text(encoding="utf-8"))


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> dict:
    """Restore trainable tensors, optimizer, scheduler and RNG; return the JSON metadata."""
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    tensors = load_file(str(path / "state.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("param."):
                name = key[len("param."):]
                if name not in params:
                    raise DeftuneError(f"Checkpoint {path} has {name}, which this model lacks "
                                       "(was the recipe's model or adapter changed?)")
                params[name].copy_(value.to(params[name].device, params[name].dtype))
    flat_params = [p for g in optimizer.param_groups for p in g["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    state = {}
    for index, param in enumerate(flat_params):
        name = names[id(param)]
        entry = {}
        for key in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            tensor = tensors.get(f"optim.{name}.{key}")
            if tensor is not None:
                entry[key] = tensor if key == "step" else tensor.to(param.device)
        if entry:
            state[index] = entry
    groups = optimizer.state_dict()["param_groups"]
    if len(groups) != len(meta["param_groups"]):
        raise DeftuneError(f"Checkpoint {path} does not match this run's optimizer (parameter groups differ)")
    for group, saved in zip(groups, meta["param_groups"]):
        group.update(saved)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    if scheduler is not None and meta.get("scheduler"):
        scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    random.setstate(_decode_random_state(meta["python_random"]))
    return meta
