"""Checkpoints that survive a crash, and resume.

A checkpoint is a folder ``checkpoints/step-000120`` holding the trainable tensors and the optimizer
state (safetensors), plus the scheduler, RNG and loop position (JSON). It is written to a temporary
folder and renamed into place, so a crash mid-write never leaves a corrupt latest checkpoint; the
``latest`` file is replaced atomically after the rename. Only the last K are kept.

``meta.json`` records the SHA-256 of the tensor file; resuming verifies it and, when the newest
checkpoint is damaged (a truncated file, an unreadable ``latest.json``), falls back to the newest intact
one with a warning naming the broken one. An I/O error while writing (a full disk) is a ``DeftuneError``
naming the path; the previous checkpoints are untouched.

Resuming with a recipe that would change the run's trajectory is refused (``resume_differences``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deftune.errors import DeftuneError

PREFIX = "step-"
STATE_FILE = "state.safetensors"

# Recipe keys that do not change what a resumed run computes (where files go, how often it logs or
# saves, how memory is traded for speed); a change to any other key is refused on resume.
RESUME_FREE_KEYS = frozenset({
    "output_dir", "device",
    "model.cache_dir", "model.attn_implementation", "model.sdpa_backend", "model.fast",
    "train.resume", "train.resume_force", "train.log_every", "train.save_every", "train.keep_last",
    "train.threads", "train.gradient_checkpointing", "train.offload_activations", "train.checkpoint_skip",
    "train.offload_mlp_layers", "train.keep_mlp_layers", "train.reuse_dequantized", "train.mlp_tile_tokens",
    "eval.every", "eval.samples", "eval.final_samples", "eval.max_new_tokens", "eval.metrics",
    "eval.language", "eval.show_examples",
    "monitor.tensorboard", "monitor.layer_grad_norms", "monitor.heatmap_every", "monitor.ineffective_fraction",
    "monitor.report",
})


class CheckpointWriteError(DeftuneError):
    """Writing a checkpoint or a run's result failed (disk full, permissions); earlier files are intact."""


def write_error(path: Path, exc: BaseException, intact: Path | None = None) -> CheckpointWriteError:
    """One message for an I/O error while writing ``path``: what failed, why, and what is still intact."""
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    kept = f"; the last good checkpoint, {intact}, is intact" if intact is not None else ""
    return CheckpointWriteError(f"Could not write {path}: {reason}{kept}. Free space (or fix the folder's "
                                "permissions), then resume with train.resume=auto")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, indent=1))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer, scheduler, step: int, extra: dict,
                    keep_last: int) -> Path:
    """Write checkpoint ``step`` (atomically: a temporary folder renamed into place) and return its folder.
    An I/O error raises ``CheckpointWriteError`` naming the path, with the earlier checkpoints intact."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{PREFIX}{step:07d}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        intact = _latest_name(root)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_checkpoint(tmp, model, optimizer, scheduler, step, extra)
        if final.exists():  # the same step saved again (a resumed run's final save): replace it whole
            old = root / f".tmp-old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _write_json(root / "latest.json", {"checkpoint": final.name, "step": step})
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        where = getattr(exc, "filename", None) or tmp
        raise write_error(Path(where), exc, root / intact if intact else None) from None
    _prune(root, keep_last)
    return final


def _latest_name(root: Path) -> str | None:
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))
    return names[-1] if names else None


def _write_checkpoint(tmp: Path, model: nn.Module, optimizer, scheduler, step: int, extra: dict) -> None:
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
    save_file(tensors, str(tmp / STATE_FILE))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt_state["param_groups"]]
    meta = {
        "step": step,
        "param_order": [names[id(p)] for p in flat_params],
        "param_groups": groups,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "python_random": _encode_random_state(random.getstate()),
        **extra,
        "sha256": {STATE_FILE: sha256_file(tmp / STATE_FILE)},
    }
    _write_json(tmp / "meta.json", meta)


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


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint folder ``path`` cannot be resumed from (None when it is intact): meta.json missing
    or unreadable, the tensor file missing, or its SHA-256 not the one meta.json recorded."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no meta.json"
    except (OSError, ValueError) as exc:
        return f"meta.json unreadable ({exc})"
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        return "meta.json has no step"
    state = path / STATE_FILE
    if not state.is_file():
        return f"no {STATE_FILE}"
    expected = (meta.get("sha256") or {}).get(STATE_FILE)
    try:
        if expected is None:  # a checkpoint from before checksums: at least its header must read
            load_file(str(state))
        elif sha256_file(state) != expected:
            return f"{STATE_FILE} does not match its recorded SHA-256 (truncated or altered)"
    except (OSError, SafetensorError) as exc:
        return f"{STATE_FILE} unreadable ({exc})"
    return None


def find_checkpoint(run_dir: Path, resume: str, warn: Callable[[str], None] = print) -> Path | None:
    """``resume``: "" (none), "auto" (the newest intact checkpoint under run_dir, if any) or a checkpoint
    folder. With "auto" a damaged checkpoint (see ``checkpoint_problem``) or an unreadable latest.json is
    passed over with a warning naming it; a named folder that is damaged is an error."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / "meta.json").is_file():
            raise DeftuneError(f"train.resume={resume!r} is not a checkpoint folder (no meta.json)")
        problem = checkpoint_problem(path)
        if problem:
            raise DeftuneError(f"train.resume={resume!r}: the checkpoint is damaged ({problem}); "
                               "name an earlier one, or use train.resume=auto to take the newest intact one")
        return path
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.glob(f"{PREFIX}*") if p.is_dir()), reverse=True)
    latest = root / "latest.json"
    if latest.exists():
        try:
            name = json.loads(latest.read_text(encoding="utf-8"))["checkpoint"]
            # latest.json names the newest; anything newer is a save whose latest.json update was lost
            candidates = sorted({root / name, *candidates}, reverse=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warn(f"warning: {latest} is unreadable ({exc}); looking for checkpoints in {root} instead")
    for path in candidates:
        if not path.is_dir():
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warn(f"warning: checkpoint {path} is damaged ({problem}); falling back to an earlier one")
    return None


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text(encoding="utf-8"))


def resume_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every recipe key (dotted) whose value differs between the recipe a
    checkpoint was made with (``saved``) and this one (``current``), except ``RESUME_FREE_KEYS``."""
    out = []
    for key in dict.fromkeys([*saved, *current]):
        dotted = f"{prefix}{key}"
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict) and dotted not in RESUME_FREE_KEYS:
            out += resume_differences(old, new, f"{dotted}.")
        elif old != new and dotted not in RESUME_FREE_KEYS:
            out.append(f"{dotted}: {old!r} -> {new!r}")
    return out


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> dict:
    """Restore trainable tensors, optimizer, scheduler and RNG; return the JSON metadata."""
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    tensors = load_file(str(path / STATE_FILE))
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


def write_folder(folder: Path, write: Callable[[Path], None], intact: Path | None = None) -> Path:
    """Fill ``folder`` through ``write(tmp)`` on a temporary sibling renamed into place, so a crash or a
    full disk never leaves a half-written folder (an older one stays whole until the new one is complete).
    An I/O error raises ``CheckpointWriteError`` naming the path (and ``intact``, the last good checkpoint)."""
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    old = folder.with_name(f".old-{folder.name}-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not folder.exists():
            os.replace(old, folder)
        raise write_error(Path(getattr(exc, "filename", None) or folder), exc, intact) from None
    shutil.rmtree(old, ignore_errors=True)
    return folder
