"""Share a global rank budget among LoRA modules by the importance of their rank components.

Budget B in cost units: each rank unit of module m costs c_m, either c_m = d_in + d_out parameters
(``param_budget`` > 0) or c_m = 1 rank unit, with

    B = R_max - s (R_max - R_min),   R_max = sum_m max(candidates),  R_min = sum_m min(candidates)

for the pruning strength s = ``sensitivity`` in [0, 1].

1. Components of all modules are ranked globally by score per cost unit, v_i / c_m (the greedy rule for
   a knapsack; with rank units it is the plain score order, as in AdaLoRA's global threshold), and taken
   while they fit the budget. Scores fall within a module, so module m keeps a prefix of n_m components.
2. Each module gets the smallest candidate >= n_m when the budget allows, else the largest candidate
   <= n_m (the smallest candidate when none is below: a module drops out only if 0 is a candidate).
   Fix-up, greedy by score per cost unit: step modules down a candidate, least value lost first, while
   over budget; then round modules up to their candidate >= n_m, most value gained first, while it fits.
3. At least one module keeps an adapter (the one of highest total score), so training can go on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass
class Budget:
    """What may be spent (``amount``, in ``unit``) and what one rank unit of each module costs."""

    amount: float
    unit: str  # "params" or "rank"
    costs: dict[str, int]


def make_budget(shapes: dict[str, tuple[int, int]], candidates: list[int], sensitivity: float,
                param_budget: int) -> Budget:
    """``shapes``: module -> (d_in, d_out), every module under dynamic rank (dropped ones included)."""
    if param_budget > 0:
        return Budget(float(param_budget), "params", {n: d_in + d_out for n, (d_in, d_out) in shapes.items()})
    hi, lo = max(candidates), min(candidates)
    total_max, total_min = hi * len(shapes), lo * len(shapes)
    amount = round(total_max - sensitivity * (total_max - total_min))
    return Budget(float(amount), "rank", {n: 1 for n in shapes})


def allocate_ranks(scores: dict[str, torch.Tensor], current: dict[str, int], costs: dict[str, int],
                   candidates: list[int], budget: float) -> dict[str, int]:
    """New rank per module of ``scores`` (component scores of its ``current`` rank components).

    A module below the largest candidate may grow (re-allocation): its missing components are valued at
    the score of its weakest present one, i.e. a module whose weakest component still beats others'
    components is taken to be short of rank.
    """
    cands = sorted(set(int(c) for c in candidates))
    top = cands[-1]
    values: dict[str, list[float]] = {}
    for name in sorted(scores):
        v = sorted((float(x) for x in scores[name]), reverse=True)[: current[name]]
        if len(v) < top:
            v += [v[-1] if v else 0.0] * (top - len(v))
        values[name] = v

    # 1. global greedy by value per cost unit
    items = [(-v / costs[n], n, i) for n, vs in values.items() for i, v in enumerate(vs)]
    items.sort()
    kept = {n: 0 for n in values}
    spent = 0.0
    for _, name, i in items:
        if i == kept[name] and spent + costs[name] <= budget + 1e-9:
            kept[name] += 1
            spent += costs[name]

    def value(name: str, rank: int) -> float:
        return sum(values[name][:rank])

    # 2. candidates: floor, then fix-up
    rank = {}
    for name, n in kept.items():
        below = [c for c in cands if c <= n]
        rank[name] = below[-1] if below else cands[0]
    total = sum(rank[n] * costs[n] for n in rank)
    while total > budget + 1e-9:
        options = []
        for name, r in rank.items():
            i = cands.index(r)
            if i > 0:
                lower = cands[i - 1]
                freed = (r - lower) * costs[name]
                options.append(((value(name, r) - value(name, lower)) / freed, name, lower))
        if not options:
            break  # the budget is below every module's smallest candidate: keep the smallest
        _, name, lower = min(options)
        total -= (rank[name] - lower) * costs[name]
        rank[name] = lower
    ups = []
    for name, n in kept.items():
        above = [c for c in cands if c >= n]
        if above and above[0] > rank[name]:
            extra = (above[0] - rank[name]) * costs[name]
            ups.append((-(value(name, above[0]) - value(name, rank[name])) / extra, name, above[0], extra))
    for _, name, up, extra in sorted(ups):
        if total + extra <= budget + 1e-9:
            rank[name] = up
            total += extra

    # 3. never drop every module
    if rank and all(r == 0 for r in rank.values()):
        best = max(rank, key=lambda n: (value(n, top), n))
        rank[best] = min(c for c in cands if c > 0)
    return rank


def adapter_param_count(ranks: dict[str, int], shapes: dict[str, tuple[int, int]]) -> int:
    return sum(r * (shapes[n][0] + shapes[n][1]) for n, r in ranks.items())


__all__ = ["Budget", "make_budget", "allocate_ranks", "adapter_param_count"]


def initial_rank(adapter) -> int:
    """The rank to attach LoRA at: the largest candidate with dynamic rank, else ``adapter.rank``."""
    return max(adapter.ranks) if adapter.ranks else adapter.rank


_LAYER = re.compile(r"layers\.(\d+)\.")


def format_ranks(ranks: dict[str, int]) -> str:
    """A layer x module table of ranks (0 = dropped out) for the console or a report."""
    grid: dict[int, dict[str, int]] = {}
    other: dict[str, int] = {}
    for name, rank in ranks.items():
        match = _LAYER.search(name)
        if match:
            grid.setdefault(int(match.group(1)), {})[name.rsplit(".", 1)[-1]] = rank
        else:
            other[name] = rank
    order = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cols = sorted({c for row in grid.values() for c in row}, key=lambda c: (order.index(c) if c in order
                                                                             else len(order), c))
    width = max([len(c) for c in cols] + [5])
    lines = ["layer " + " ".join(f"{c:>{width}}" for c in cols)] if grid else []
    for layer in sorted(grid):
        lines.append(f"{layer:<5} " + " ".join(f"{grid[layer].get(c, ''):>{width}}" for c in cols))
    lines += [f"{name}: {rank}" for name, rank in sorted(other.items())]
    return "\n".join(lines)
