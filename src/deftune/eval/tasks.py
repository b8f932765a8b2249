"""Exact-match scoring for tasks whose answers can be checked verbatim (e.g. the bundled demo task)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["normalize_answer", "exact_match"]


def normalize_answer(text: str, keep_lines: bool = False) -> str:
    """Reduce a generated answer to the part that is scored.

    The text is cut at the first newline or at the first ``"###"`` (the seed template's section
    marker), so trailing chatter after the answer does not count, then surrounding whitespace is
    stripped. Leading whitespace/newlines are removed before cutting, so an answer that starts on a
    new line is still found. ``keep_lines`` (used when the reference itself spans several lines) cuts
    only at ``"###"``.

    >>> normalize_answer("  2021-03-05\\n### Instruction: more")
    '2021-03-05'
    """
    text = (text or "").strip()
    # Multi-line references (long-form answers) keep their lines; only the next section marker ends them.
    for marker in (("###",) if keep_lines else ("\n", "###")):
        idx = text.find(marker)
        if idx != -1:
            text = text[:idx]
    return text.strip()


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction (in [0, 1]) of predictions equal to their reference after :func:`normalize_answer`.

    Both sequences must have the same length; an empty pair scores 0.0.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    hits = sum(
        normalize_answer(p, _multiline(r)) == normalize_answer(r, True) for p, r in zip(predictions, references)
    )
    return hits / len(references)


def _multiline(reference: str) -> bool:
    return "\n" in (reference or "").strip()
