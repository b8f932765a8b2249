"""One exception type for every problem the user can fix (bad config, bad data, missing file).

The CLI prints these as a single clear message without a traceback; anything else is a bug and keeps
its traceback.
"""

import importlib


class DeftuneError(Exception):
    """A problem in the user's input (recipe, data, model path) with a message saying how to fix it."""


class MissingExtraError(DeftuneError, ImportError):
    """An optional dependency is missing; the message names the extra that installs it."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed. "
            f"Install it with: pip install 'deftune[{extra}]'"
        )
        self.package = package
        self.extra = extra


def require(module: str, extra: str, purpose: str):
    """Import an optional module lazily, or raise MissingExtraError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(module.split(".")[0], extra, purpose) from exc
