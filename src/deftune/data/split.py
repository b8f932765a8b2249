"""Seeded train/eval split."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

from deftune.errors import DeftuneError

T = TypeVar("T")


def split_train_eval(items: Sequence[T], eval_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Hold out ``round(eval_fraction * n)`` items (at least 1 when the fraction is > 0 and n >= 2).

    The held-out indices come from ``random.Random(seed)`` shuffling ``range(n)``, so the same seed and
    data give the same split on every machine; both parts keep the items' original order.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise DeftuneError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(items)
    if eval_fraction == 0.0 or n < 2:
        return list(items), []
    n_eval = min(n - 1, max(1, round(eval_fraction * n)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_eval])
    train = [item for i, item in enumerate(items) if i not in held_out]
    evaluation = [item for i, item in enumerate(items) if i in held_out]
    return train, evaluation
