"""Which parameters a name mask (glob patterns) and a layer mask allow to change."""

from __future__ import annotations

from fnmatch import fnmatchcase

from deftune.models.arch import _LAYER_RE


def layer_index(name: str) -> int | None:
    """Decoder layer of a parameter (``model.layers.7.mlp.up_proj.lora_A.weight`` -> 7), or None for
    parameters outside the decoder layers (embeddings, final norm, LM head). Same rule as ``models.arch``."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def allowed_by_name_and_layer(name: str, patterns: list[str], layers: set[int] | None) -> bool:
    """True when ``name`` matches one of ``patterns`` (no patterns = any name) and lies in ``layers``
    (None = any layer). A parameter outside the decoder layers is in no layer, so a layer mask freezes it.
    Patterns are case-sensitive ``fnmatch`` globs over the full dotted name."""
    if patterns and not any(fnmatchcase(name, p) for p in patterns):
        return False
    if layers is not None and layer_index(name) not in layers:
        return False
    return True
