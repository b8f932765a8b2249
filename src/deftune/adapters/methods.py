"""The registry of tuning methods: the one place a method's name is looked up.

A method is one module (a :class:`~deftune.adapters.base.Method` subclass: attach, trainable parameters,
save, load, merge and its own recipe checks) plus one ``register`` line. Recipes, the CLI and the config
check ask the registry; nothing else branches on a method's name.
"""

from __future__ import annotations

import difflib

from deftune import config
from deftune.adapters.base import Method
from deftune.adapters.experts.method import ESFT, ExpertLoRA
from deftune.adapters.full.method import Full
from deftune.adapters.lora.method import LoRA
from deftune.errors import DeftuneError

__all__ = ["Method", "register", "get_method", "method_names", "check_recipe"]

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` under ``method.name`` (replacing one of the same name); returns it."""
    if not method.name or not method.output:
        raise ValueError(f"{type(method).__name__}: a method needs a name and an output folder")
    _REGISTRY[method.name] = method
    return method


def method_names() -> list[str]:
    return list(_REGISTRY)


def get_method(name: str) -> Method:
    """The registered method called ``name``; an unknown name is an error listing the close matches."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise DeftuneError(f"method must be one of {', '.join(_REGISTRY)}, got {name!r}{hint}")
    return _REGISTRY[name]


def check_recipe(recipe) -> None:
    """What every recipe gets when it is read: the method exists, and its own checks pass."""
    method = get_method(recipe.method)
    if recipe.model.quantize != "none" and not method.quantized_base:
        # A 4-bit weight has no gradient to follow: quantized bases are frozen (QLoRA trains adapters).
        able = ", ".join(n for n, m in _REGISTRY.items() if m.quantized_base)
        raise DeftuneError(f"model.quantize={recipe.model.quantize} freezes the base weights in 4 bits; "
                           f"method {method.name} updates them. Use a method that trains adapters over it "
                           f"({able}) or model.quantize=none")
    method.check(recipe)


for _method in (LoRA(), Full(), ESFT(), ExpertLoRA()):
    register(_method)
config.set_recipe_checker(check_recipe)
