"""The Python API; the CLI verbs are thin wrappers over these functions, each of which hands its work to
a job in :mod:`deftune.recipes`.

    import deftune
    summary = deftune.train("my_recipe.yaml", ["train.max_steps=100"])
    print(deftune.evaluate("runs/demo", data="demo-eval"))
    print(deftune.generate("runs/demo", "Convert this date to ISO 8601: 5 March 2021"))
    deftune.merge("runs/demo", out="merged/")
"""

from __future__ import annotations

import os
from pathlib import Path

from deftune.config import Recipe
from deftune.recipes import inference, sft
from deftune.recipes.inference import load_for_inference
from deftune.recipes.sft import RunSummary

__all__ = ["train", "evaluate", "generate", "merge", "load_for_inference", "RunSummary", "print_summary"]

# The tokenizers library's thread pool does not survive the fork of a DataLoader worker or a subprocess.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def train(recipe: str | Path | Recipe | None = None, overrides: list[str] | tuple = (),
          progress: bool = True) -> RunSummary:
    """Run a recipe end to end (default: the bundled demo recipe): load, prepare data, score before,
    train, save, score after. ``overrides``: ``key=value`` strings, as on the command line."""
    return sft.run(recipe, overrides, progress)


def evaluate(run_or_model: str, data: str, device: str = "auto", overrides: list[str] | tuple = (),
             max_records: int = 0, trust_remote_code: bool = False) -> dict:
    """Eval loss, perplexity and the generation metrics of ``eval.metrics`` of a run or model on every
    record of ``data`` (the first ``max_records`` when > 0). ``trust_remote_code``: let the model
    folder's own Python code run (never taken from a run folder's recipe.yaml)."""
    return inference.evaluate(run_or_model, data, device, overrides, max_records, trust_remote_code)


def generate(run_or_model: str, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, raw: bool = False, stream: bool = False,
             device: str = "auto", trust_remote_code: bool = False) -> str:
    """Answer ``prompt`` with a run or model, in the run's prompt template unless ``raw``; temperature 0
    is greedy."""
    return inference.generate(run_or_model, prompt, max_new_tokens, temperature, top_p, top_k, raw, stream,
                              device, trust_remote_code)


def merge(run: str, out: str, device: str = "cpu", trust_remote_code: bool = False) -> Path:
    """Merge a run's trained update into its base weights and save a plain Hugging Face folder at ``out``."""
    return inference.merge(run, out, device, trust_remote_code)


def print_summary(summary: RunSummary) -> None:
    print()
    print(f"Run folder: {summary.run_dir}  ({summary.steps} steps in {summary.seconds}s, "
          f"{summary.tokens_per_s} tokens/s)")
    keys = [k for k in ("eval_loss", "eval_ppl", "exact_match", "token_f1", "bleu4", "rougeL")
            if k in summary.before or k in summary.after]
    if keys:
        print(f"{'held-out':<14}{'before':>12}{'after':>12}")
        for key in keys:
            b, a = summary.before.get(key, ""), summary.after.get(key, "")
            if key in ("exact_match", "token_f1", "rougeL"):
                b, a = f"{100 * b:.1f}%" if b != "" else "", f"{100 * a:.1f}%" if a != "" else ""
            print(f"{key:<14}{b!s:>12}{a!s:>12}")
    for ex in summary.examples:
        mark = "ok " if ex["prediction"].strip() == ex["reference"].strip() else "bad"
        print(f"  [{mark}] {ex['query'][:70]!r}\n        -> {ex['prediction'][:60]!r} (expected {ex['reference']!r})")
    print(f"Saved: {summary.output}")
    if summary.report:
        print(f"Report: {summary.report}  (TensorBoard: tensorboard --logdir {summary.run_dir})")
