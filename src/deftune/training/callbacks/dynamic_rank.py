"""Dynamic-rank LoRA during training: score rank components, then shrink (or grow) each module.

Life cycle (a ``Callback`` of the trainer; T = total steps, window [w0, w1] = ``adapter.rank_window``):

* Every module starts at the largest candidate rank.
* Steps t in [round(w0 T), round(w1 T)): after each backward, the importance of every rank component is
  updated from the gradients already present (``importance.py``: AdaLoRA's Ibar * Ubar of the gate
  sensitivity |<B_i, dL/dB_i>|). B starts at zero, so the sensitivity is zero until B has moved: with
  w0 = 0 the first step only adds zeros to every EMA alike.
* At the window end the global budget is shared out (``allocate.py``) and each module is physically
  resized to the best rank-k subspace of its current update (``LoRALinear.resize``: SVD in rank space,
  scaling s kept, alpha = s k); rank 0 puts the plain base linear back. The optimizer is rebuilt so AdamW
  state exists only for live tensors (resized ones start fresh, unchanged ones keep theirs).
* With ``rank_reallocate_every`` = N, scoring goes on and the allocation is redone every N steps; modules
  may then grow back up to the largest candidate (new components start like LoRA's init: B = 0).
  A module that dropped to 0 has no components left to score and stays out.

Resume: ``state_dict`` holds the rank of every module (and the EMAs while scoring); ``load_state_dict``
gives the modules those shapes before the trainer restores tensors and optimizer state.
"""

from __future__ import annotations

import torch

from deftune.adapters.dynamic_rank.allocate import adapter_param_count, allocate_ranks, make_budget
from deftune.adapters.dynamic_rank.importance import ComponentImportance, gate_sensitivity
from deftune.adapters.lora.layer import LoRALinear
from deftune.adapters.lora.model import lora_modules, unwrap_lora
from deftune.errors import DeftuneError
from deftune.training.callbacks.base import Callback


def window_steps(window, total_steps: int) -> tuple[int, int]:
    """Step indices [start, end) of the scoring window; allocation happens once ``end`` steps are done."""
    end = min(total_steps, max(1, round(window[1] * total_steps)))
    start = min(round(window[0] * total_steps), end - 1)
    return start, end


class DynamicRankCallback(Callback):
    """AdaLoRA-style rank allocation with physical resizing (see the module docstring)."""

    name = "dynamic_rank"

    def __init__(self, candidates: list[int], sensitivity: float = 0.5, param_budget: int = 0,
                 window=(0.05, 0.3), reallocate_every: int = 0, beta1: float = 0.85, beta2: float = 0.85):
        self.candidates = sorted(set(int(c) for c in candidates))
        if not self.candidates or self.candidates[-1] < 1:
            raise DeftuneError(f"dynamic rank needs a candidate rank >= 1, got {candidates}")
        self.sensitivity = sensitivity
        self.param_budget = param_budget
        self.window = tuple(window)
        self.reallocate_every = reallocate_every
        self.importance = ComponentImportance(beta1, beta2)
        self.shapes: dict[str, tuple[int, int]] = {}  # every managed module: (d_in, d_out)
        self.ranks: dict[str, int] = {}  # current rank of every managed module, 0 = dropped
        self.allocations = 0
        self.last_allocation_step = -1
        self.start, self.end = 0, 1

    # -- trainer hooks -------------------------------------------------------------------------
    def on_train_start(self, trainer) -> None:
        self.start, self.end = window_steps(self.window, trainer.total_steps)
        self._register(trainer.model)
        if not self.ranks:
            raise DeftuneError("adapter.ranks (dynamic rank) needs LoRA modules: none are attached")

    def _register(self, model) -> None:
        # Modules attached later (progressive unfreezing) join at whatever rank they have.
        for name, module in lora_modules(model).items():
            if name not in self.ranks:
                self.shapes[name] = (module.in_features, module.out_features)
                self.ranks[name] = module.rank

    def _scoring(self, step: int) -> bool:
        if self.allocations == 0:
            return self.start <= step < self.end
        return self.reallocate_every > 0 and step >= self.end

    def after_backward(self, trainer) -> None:
        if not self._scoring(trainer.step):
            return
        names, values = [], []
        for name, module in lora_modules(trainer.model).items():
            sensitivity = gate_sensitivity(module)
            if sensitivity is not None and name in self.ranks:
                names.append(name)
                values.append(sensitivity)
        # One finiteness check (one device sync) for all modules, not one per module.
        if not values or not bool(torch.isfinite(torch.cat(values)).all()):
            return
        for name, sensitivity in zip(names, values):
            self.importance.update(name, sensitivity)

    def on_step_end(self, trainer) -> None:
        step = trainer.step
        if self.allocations == 0:
            if step >= self.end:
                self.allocate(trainer)
        elif (self.reallocate_every > 0 and self.end <= step < trainer.total_steps
              and (step - self.end) % self.reallocate_every == 0 and step > self.last_allocation_step):
            self.allocate(trainer)

    # -- allocation ----------------------------------------------------------------------------
    @torch.no_grad()
    def allocate(self, trainer) -> dict[str, int]:
        """Share the budget by the current scores, resize the modules, rebuild the optimizer, log."""
        model = trainer.model
        self._register(model)
        modules = {n: m for n, m in lora_modules(model).items() if n in self.ranks}
        budget = make_budget(self.shapes, self.candidates, self.sensitivity, self.param_budget)
        scores = self.importance.scores()
        scored = {n: scores[n] for n, m in modules.items() if n in scores and scores[n].shape[0] == m.rank}
        # Modules without a score (no gradient in the window, e.g. not yet unfrozen) keep their rank and
        # spend their share of the budget first.
        fixed_cost = sum(m.rank * budget.costs[n] for n, m in modules.items() if n not in scored)
        before = adapter_param_count(self.ranks, self.shapes)
        new = allocate_ranks(scored, {n: modules[n].rank for n in scored}, budget.costs, self.candidates,
                             budget.amount - fixed_cost) if scored else {}
        for name, rank in new.items():
            if rank == modules[name].rank:
                continue  # same tensors: AdamW keeps their moments
            if rank == 0:
                unwrap_lora(model, name)
            else:
                modules[name].resize(rank)
            self.ranks[name] = rank
        self.importance.reset()  # components were rotated/truncated: old scores no longer apply
        self.allocations += 1
        self.last_allocation_step = trainer.step
        trainer.rebuild_optimizer()
        after = adapter_param_count(self.ranks, self.shapes)
        trainer.log({"step": trainer.step, "event": "rank_allocation", "ranks": dict(self.ranks),
                      "adapter_params": after, "budget": budget.amount, "budget_unit": budget.unit})
        trainer.say(f"step {trainer.step}: dynamic rank {self._summary()}; adapter params {before:,} -> "
                     f"{after:,} (budget {budget.amount:,.0f} {budget.unit})")
        return dict(self.ranks)

    def _summary(self) -> str:
        counts: dict[int, int] = {}
        for r in self.ranks.values():
            counts[r] = counts.get(r, 0) + 1
        return "ranks " + ", ".join(f"{r}: {c} module(s)" for r, c in sorted(counts.items(), reverse=True))

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"ranks": dict(self.ranks), "shapes": {n: list(s) for n, s in self.shapes.items()},
                "allocations": self.allocations, "last_allocation_step": self.last_allocation_step,
                "importance": self.importance.state_dict()}

    def load_state_dict(self, state: dict, trainer) -> None:
        if not state:
            return
        model = trainer.model
        for name, rank in state["ranks"].items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise DeftuneError(f"dynamic rank: checkpoint module {name} is not in this model")
            if isinstance(module, LoRALinear):
                if rank == 0:
                    unwrap_lora(model, name)
                elif rank != module.rank:
                    module.resize(rank, keep_update=False)  # the checkpoint's tensors are loaded next
            elif rank > 0:
                raise DeftuneError(f"dynamic rank: checkpoint has {name} at rank {rank} but it carries no "
                                   "LoRA adapter here (was the recipe's adapter changed?)")
        self.ranks = {n: int(r) for n, r in state["ranks"].items()}
        self.shapes = {n: (int(s[0]), int(s[1])) for n, s in state.get("shapes", {}).items()} or self.shapes
        self.allocations = int(state.get("allocations", 0))
        self.last_allocation_step = int(state.get("last_allocation_step", -1))
        self.importance.load_state_dict(state.get("importance", {}), trainer.device)

    # -- reporting -----------------------------------------------------------------------------
    def final_ranks(self) -> dict[str, int]:
        """Rank of every managed module, 0 for those that dropped out."""
        return dict(self.ranks)


def from_recipe(recipe, model) -> DynamicRankCallback | None:
    """The callback for ``recipe.adapter.ranks`` (None when empty). Call after LoRA is attached at
    ``initial_rank(recipe.adapter)``."""
    a = recipe.adapter
    if not a.ranks:
        return None
    modules = lora_modules(model)
    top = max(a.ranks)
    wrong = sorted(n for n, m in modules.items() if m.rank != top)
    if not modules or wrong:
        found = "no LoRA modules" if not modules else f"{wrong[0]} has rank {modules[wrong[0]].rank}"
        raise DeftuneError(f"dynamic rank: attach LoRA at rank max(adapter.ranks) = {top} first ({found})")
    return DynamicRankCallback(a.ranks, a.sensitivity, a.param_budget, a.rank_window, a.rank_reallocate_every)


__all__ = ["DynamicRankCallback", "from_recipe", "window_steps"]
