"""Validation: eval loss / perplexity on the eval split, and generation metrics on a sample of it."""

from __future__ import annotations

import math

import torch
from torch import nn

from deftune.config import Recipe
from deftune.data.templates import prompt_for_generation
from deftune.eval.generation import generate_texts
from deftune.eval.metrics import score_generations
from deftune.eval.tasks import normalize_answer
from deftune.training.loop import evaluate_loss


def validation_metrics(model: nn.Module, tokenizer, eval_examples, eval_samples, recipe: Recipe,
                       device: torch.device, n_samples: int) -> tuple[dict, list[dict]]:
    """``(metrics, examples)``: eval_loss and eval_ppl over every eval example, then greedy answers for the
    first ``n_samples`` eval samples scored by ``recipe.eval.metrics`` (tokenisers named in the result)."""
    result: dict = {}
    if eval_examples:
        loss = evaluate_loss(model, eval_examples, recipe.train.micro_batch, tokenizer.pad_token_id, device)
        result.update(eval_loss=round(loss, 4), eval_ppl=round(math.exp(min(loss, 50)), 3))
    examples: list[dict] = []
    n = min(n_samples, len(eval_samples))
    if recipe.eval.metrics and n > 0:
        chosen = eval_samples[:n]
        prompts = [prompt_for_generation(s, tokenizer, recipe.data.template, recipe.data.system_prompt)
                   for s in chosen]
        predictions = generate_texts(model, tokenizer, prompts, recipe.eval.max_new_tokens)
        references = [s.response for s in chosen]
        scores = score_generations(predictions, references, recipe.eval.metrics, recipe.eval.language)
        result.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.items()})
        result["samples"] = n
        examples = [
            {"query": s.query, "reference": r, "prediction": normalize_answer(p)}
            for s, r, p in zip(chosen, references, predictions)
        ]
    return result, examples
