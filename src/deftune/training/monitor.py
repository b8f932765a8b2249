"""Watching and steering a run: TensorBoard scalars, per-layer gradient norms, the update heatmap, the
gradient-norm guard, non-finite handling and the plateau controller.

Everything here is state the trainer consults once per step or per evaluation; each piece serialises to
JSON so a resumed run continues with the same guard window, plateau counters and LR multiplier.
"""

from __future__ import annotations

import math
import re
import resource
from collections import deque
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deftune.adapters.lora.layer import LoRALinear
from deftune.config import HIGHER_IS_BETTER
from deftune.errors import require

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


# -- gradient norms -------------------------------------------------------------------------------
def layer_grad_norms(model: nn.Module) -> dict[int, float]:
    """L2 norm of the gradients of each decoder layer's trainable parameters.

    Summed on the device and read back once, so a GPU step pays one synchronisation, not one per tensor.
    """
    squares: dict[int, list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        match = _LAYER_RE.search(name)
        if match:
            squares.setdefault(int(match.group(1)), []).append(param.grad.detach().float().pow(2).sum())
    if not squares:
        return {}
    layers = sorted(squares)
    norms = torch.stack([torch.stack(squares[layer]).sum() for layer in layers]).sqrt().tolist()
    return dict(zip(layers, norms))


class GradNormGuard:
    """3-sigma spike detector on the global gradient norm.

    Keeps the last ``window`` accepted norms g_i; once ``warmup`` of them are seen, a step with
    z = (g - mean) / std > k is a spike. Spikes are not added to the window, so one outlier cannot widen
    the band that should catch the next one.
    """

    def __init__(self, k: float = 3.0, window: int = 50, warmup: int = 20):
        self.k, self.window, self.warmup = k, window, warmup
        self.history: deque[float] = deque(maxlen=window)

    def band(self) -> tuple[float, float] | None:
        if len(self.history) < self.warmup:
            return None
        n = len(self.history)
        mean = sum(self.history) / n
        var = sum((g - mean) ** 2 for g in self.history) / max(1, n - 1)
        return mean, math.sqrt(var)

    def check(self, grad_norm: float) -> float | None:
        """Return the z-score if ``grad_norm`` is a spike (not recorded), else record it and return None."""
        band = self.band()
        if band is not None:
            mean, std = band
            z = (grad_norm - mean) / max(std, 1e-12)
            if z > self.k:
                return z
        self.history.append(grad_norm)
        return None

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state.get("history", []), maxlen=self.window)


# -- plateau --------------------------------------------------------------------------------------
class PlateauController:
    """Multiply the LR schedule by ``factor`` after ``patience`` evaluations without improvement
    (ReduceLROnPlateau-style), never below ``min_scale``; count towards an optional early stop."""

    def __init__(self, metric: str, patience: int = 3, factor: float = 0.5, min_scale: float = 0.01,
                 early_stop_patience: int = 0):
        self.metric = metric
        self.higher_is_better = HIGHER_IS_BETTER[metric]
        self.patience, self.factor, self.min_scale = patience, factor, min_scale
        self.early_stop_patience = early_stop_patience
        self.best: float | None = None
        self.bad_evals = 0  # since the last improvement or LR reduction
        self.since_best = 0  # since the last improvement (early stop)
        self.scale = 1.0

    def improved(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.higher_is_better else value < self.best

    def update(self, value: float) -> dict:
        """Feed one evaluation; return what happened: {'best': bool, 'reduced': bool, 'stop': bool}."""
        out = {"best": False, "reduced": False, "stop": False}
        if math.isnan(value):
            value = -math.inf if self.higher_is_better else math.inf
        if self.improved(value):
            self.best = value
            self.bad_evals = 0
            self.since_best = 0
            out["best"] = True
            return out
        self.bad_evals += 1
        self.since_best += 1
        if self.bad_evals >= self.patience:
            new_scale = max(self.min_scale, self.scale * self.factor)
            out["reduced"] = new_scale < self.scale
            self.scale = new_scale
            self.bad_evals = 0
        if self.early_stop_patience and self.since_best >= self.early_stop_patience:
            out["stop"] = True
        return out

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_evals": self.bad_evals, "since_best": self.since_best,
                "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best")
        self.bad_evals = state.get("bad_evals", 0)
        self.since_best = state.get("since_best", 0)
        self.scale = state.get("scale", 1.0)


# -- update heatmap -------------------------------------------------------------------------------
class UpdateTracker:
    """Relative update of each adapted module, layer x module.

    LoRA: ||s B A||_F / ||W0||_F, with ||B A||_F^2 = tr((B^T B)(A A^T)) computed in rank space (r x r)
    so the full d_out x d_in product is never formed. Full tuning: ||W_t - W_0||_F / ||W_0||_F against a
    CPU copy of W_0 taken at the start.
    """

    def __init__(self, model: nn.Module):
        self.base_norms: dict[str, float] = {}
        self.initial: dict[str, torch.Tensor] = {}
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear):
                base = module.base_layer
                # A 4-bit base (QLoRA) has no dense weight to read: ||dequant(W)||_F.
                w0 = base.dequantize() if hasattr(base, "dequantize") else base.weight
                self.base_norms[name] = float(w0.detach().float().norm())
        if not self.base_norms:
            for name, param in model.named_parameters():
                if param.requires_grad and param.ndim >= 2 and _LAYER_RE.search(name):
                    module_name = name.rsplit(".", 1)[0]
                    self.initial[name] = param.detach().to("cpu", torch.float32, copy=True)
                    self.base_norms[module_name] = float(self.initial[name].norm())

    @torch.no_grad()
    def measure(self, model: nn.Module) -> dict:
        values: dict[tuple[int, str], float] = {}
        if self.initial:
            params = dict(model.named_parameters())
            for name, w0 in self.initial.items():
                module_name = name.rsplit(".", 1)[0]
                delta = float((params[name].detach().to("cpu", torch.float32) - w0).norm())
                values[_site(module_name)] = delta / max(self.base_norms[module_name], 1e-12)
        else:
            for name, module in model.named_modules():
                if isinstance(module, LoRALinear) and name in self.base_norms:
                    a = module.lora_A.weight.float()
                    b = module.lora_B.weight.float()
                    sq = torch.trace((b.T @ b) @ (a @ a.T)).clamp_min(0)
                    values[_site(name)] = float(sq.sqrt()) * abs(module.scaling) / max(self.base_norms[name], 1e-12)
        layers = sorted({layer for layer, _ in values})
        modules = sorted({m for _, m in values}, key=_module_order)
        grid = [[values.get((layer, m)) for m in modules] for layer in layers]
        return {"layers": layers, "modules": modules, "values": grid}


_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _module_order(name: str):
    return (_ORDER.index(name) if name in _ORDER else len(_ORDER), name)


def _site(module_name: str) -> tuple[int, str]:
    match = _LAYER_RE.search(module_name)
    layer = int(match.group(1)) if match else -1
    return layer, module_name.rsplit(".", 1)[-1]


# -- memory ---------------------------------------------------------------------------------------
def peak_memory_gib(device: torch.device) -> float:
    """GPU: peak allocated by torch; CPU: peak resident set size of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


# -- TensorBoard ----------------------------------------------------------------------------------
class Board:
    """TensorBoard writer that is a no-op when disabled (or on non-main ranks)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.writer = None
        if enabled:
            require("tensorboard", "monitor", "TensorBoard logging (monitor.tensorboard=true)")
            from torch.utils.tensorboard import SummaryWriter  # tensorboard: optional (extra `monitor`)

            self.writer = SummaryWriter(log_dir=str(run_dir))

    def scalars(self, values: dict, step: int, prefix: str) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def image_png(self, tag: str, png_path: Path, step: int) -> None:
        if self.writer is None:
            return
        from PIL import Image  # Pillow comes with matplotlib (optional extra `monitor`)

        image = np.asarray(Image.open(png_path).convert("RGB"))
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
