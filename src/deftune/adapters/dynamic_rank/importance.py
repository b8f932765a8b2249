"""Importance of each rank component of a LoRA module, AdaLoRA-style.

Component i of a module is the rank-1 term s * B[:, i] A[i, :] of its update. Put a gate g_i = 1 on it,
dW = s * B diag(g) A. The gate's sensitivity (first-order Taylor estimate of the loss change when the
component is removed; Molchanov et al. 2019, Zhang et al. 2023) is

    I_i = |g_i * dL/dg_i| = |s * B[:, i]^T G A[i, :]^T| = |<B[:, i], dL/dB[:, i]>|     (G = dL/d(dW))

since dL/dB = s G A^T. It reads off gradients the backward pass already produced: no extra backward.
AdaLoRA (Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
ICLR, arXiv:2303.10512, eqs. 8-10) smooths the noisy mini-batch estimate and weighs in its uncertainty:

    Ibar_t = beta1 Ibar_{t-1} + (1 - beta1) I_t
    Ubar_t = beta2 Ubar_{t-1} + (1 - beta2) |I_t - Ibar_t|
    score  = Ibar_t * Ubar_t                                     (beta1 = beta2 = 0.85)

Both EMAs start at 0 as in AdaLoRA; every component of every module is updated the same number of times,
so the missing bias correction scales all scores alike and leaves the ranking unchanged.

I_i is the loss change from removing the component, a quantity in loss units whatever the module's shape,
so scores are compared across modules as they are (no per-module normalisation: normalising would give
every module the same total importance and push all of them towards the same rank, defeating the point).
"""

from __future__ import annotations

import torch

from deftune.adapters.lora.layer import LoRALinear


@torch.no_grad()
def gate_sensitivity(module: LoRALinear) -> torch.Tensor | None:
    """|<B[:, i], dL/dB[:, i]>| per component i (float32, shape (r,)); None when B has no gradient."""
    grad = module.lora_B.weight.grad
    if grad is None:
        return None
    return (module.lora_B.weight.float() * grad.float()).sum(dim=0).abs()


class ComponentImportance:
    """EMA of the sensitivity and of its uncertainty, per module and rank component."""

    def __init__(self, beta1: float = 0.85, beta2: float = 0.85):
        self.beta1, self.beta2 = beta1, beta2
        self.ibar: dict[str, torch.Tensor] = {}
        self.ubar: dict[str, torch.Tensor] = {}
        self.updates: dict[str, int] = {}

    def reset(self) -> None:
        self.ibar.clear()
        self.ubar.clear()
        self.updates.clear()

    @torch.no_grad()
    def update(self, name: str, sensitivity: torch.Tensor) -> None:
        if not bool(torch.isfinite(sensitivity).all()):
            return  # a non-finite gradient carries no information about importance
        ibar = self.ibar.get(name)
        if ibar is None or ibar.shape != sensitivity.shape:
            ibar = torch.zeros_like(sensitivity)
            self.ubar[name] = torch.zeros_like(sensitivity)
            self.updates[name] = 0
        ibar = self.beta1 * ibar + (1 - self.beta1) * sensitivity
        self.ubar[name] = self.beta2 * self.ubar[name] + (1 - self.beta2) * (sensitivity - ibar).abs()
        self.ibar[name] = ibar
        self.updates[name] += 1

    def scores(self) -> dict[str, torch.Tensor]:
        """Ibar * Ubar per module (CPU float32), only for modules updated at least once."""
        return {n: (self.ibar[n] * self.ubar[n]).detach().cpu() for n in self.ibar if self.updates.get(n)}

    def state_dict(self) -> dict:
        return {n: {"ibar": self.ibar[n].tolist(), "ubar": self.ubar[n].tolist(), "updates": self.updates[n]}
                for n in self.ibar}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.reset()
        for name, entry in state.items():
            self.ibar[name] = torch.tensor(entry["ibar"], dtype=torch.float32, device=device)
            self.ubar[name] = torch.tensor(entry["ubar"], dtype=torch.float32, device=device)
            self.updates[name] = int(entry["updates"])
