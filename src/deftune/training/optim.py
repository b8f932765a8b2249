"""AdamW with decoupled weight decay and a warm-up + decay learning-rate schedule.

AdamW: Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization" (arXiv:1711.05101).
Schedule for step s of S with W warm-up steps and floor m (fraction of the peak lr):

    lr(s) = lr * (s + 1) / W                                    s < W   (linear warm-up)
    lr(s) = lr * (m + (1 - m) * 0.5 * (1 + cos(pi * p)))        cosine, p = (s - W) / (S - W)
    lr(s) = lr * (m + (1 - m) * (1 - p))                        linear
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deftune.config import TrainConfig
from deftune.errors import DeftuneError


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.warmup >= 1:
        return int(cfg.warmup)
    return int(round(cfg.warmup * total_steps))


def lr_factor(step: int, total_steps: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def param_groups(model: nn.Module, weight_decay: float, starts: dict[str, int] | None = None) -> list[dict]:
    """Decay matrices only: norms, biases and other 1-D tensors are not decayed (standard practice).

    ``starts`` maps a parameter name to the step it joined training (progressive unfreezing); each start
    gets its own groups so its LR can warm up from there. Empty groups are dropped.
    """
    starts = starts or {}
    buckets: dict[tuple[int, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        buckets.setdefault((starts.get(name, 0), param.ndim >= 2), []).append(param)
    groups = []
    for (start, decay), params in sorted(buckets.items(), key=lambda kv: (kv[0][0], not kv[0][1])):
        groups.append({"params": params, "weight_decay": weight_decay if decay else 0.0, "start_step": start})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig, total_steps: int, scale=lambda: 1.0,
                    starts: dict[str, int] | None = None, stage_warmup: int = 0, current_step: int = 0):
    """Return ``(optimizer, scheduler)``; the scheduler is stepped once per optimizer step.

    ``scale()`` multiplies the schedule (the plateau controller's LR reduction). Parameters that joined at
    step t0 > 0 (``starts``) get an extra linear warm-up over ``stage_warmup`` steps from t0.
    ``current_step`` > 0 builds the pair mid-run (adapters added or resized) at that schedule position.
    """
    groups = param_groups(model, cfg.weight_decay, starts)
    if not groups:
        raise DeftuneError("No trainable parameters: check adapter.targets and adapter.layers")
    on_cuda = groups[0]["params"][0].is_cuda
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8, fused=on_cuda or None)
    warmup = warmup_steps(cfg, total_steps)

    def make_lambda(start: int):
        def factor(s: int) -> float:
            base = lr_factor(s, total_steps, warmup, cfg.schedule, cfg.min_lr_ratio) * scale()
            if start > 0 and stage_warmup > 0:
                base *= min(1.0, max(0, s - start + 1) / stage_warmup)
            return base
        return factor

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [make_lambda(g["start_step"]) for g in optimizer.param_groups], last_epoch=current_step - 1
    )
    return optimizer, scheduler
