"""deftune: fast, memory-lean fine-tuning of large language models."""

__version__ = "0.1.0"

from deftune.api import evaluate, generate, merge, train  # noqa: E402

__all__ = ["train", "evaluate", "generate", "merge", "__version__"]
