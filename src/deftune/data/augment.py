"""Template augmentation: each epoch, re-render a fraction of the training samples with another phrasing.

A model fine-tuned on one prompt layout learns that layout as much as the task, and degrades when users
phrase the instruction differently. Training on several templates per task makes it robust to the
instruction format (T0, Sanh et al. 2022, "Multitask Prompted Training Enables Zero-Shot Task
Generalization"; the Flan collection, Longpre et al. 2023, "The Flan Collection: Designing Data and
Methods for Effective Instruction Tuning", which mixes templates per task).

Each epoch ``k = round(fraction * n)`` of the ``n`` training examples (Python's round, half to even)
are chosen with ``random.Random(f"deftune-augment:{seed}:{epoch}")`` (a string seed is hashed with
SHA-512, so the choice is the same in every process and changes between epochs) and re-tokenized with:

- single-turn templates (``seed`` or a custom string): another entry of :data:`SEED_TEMPLATE_POOL`;
- the chat template: the tokenizer's template as before, with the last user message's text wrapped
  in another entry of :data:`CHAT_WRAPPER_POOL`, so the turn markup is unchanged.

The phrasing in use is never drawn. Responses are untouched, and tokenization is that of
:func:`deftune.data.tokenize.tokenize_samples` (response-only labels, EOS, truncation at max_length).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from deftune.data.formats import Sample
from deftune.data.templates import SEED_TEMPLATE, render
from deftune.data.tokenize import Example, tokenize_samples
from deftune.errors import DeftuneError

if TYPE_CHECKING:
    from deftune.config import DataConfig
    from deftune.data.tokenize import PreparedData

# Single-turn phrasings of the instruction / response markers; the first is the seed template itself,
# so custom templates can be augmented with it too.
SEED_TEMPLATE_POOL: tuple[str, ...] = (
    SEED_TEMPLATE,
    "### Task:\n{query}\n### Answer:\n",
    "Instruction: {query}\nResponse: ",
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{query}\n\n### Response:\n",
    "Q: {query}\nA: ",
    "Question: {query}\nAnswer: ",
    "{query}\n\n### Response:\n",
    "User: {query}\nAssistant: ",
)

# Wrappers of the last user message under a chat template; "{query}" is the plain text (the one in use).
CHAT_WRAPPER_POOL: tuple[str, ...] = (
    "{query}",
    "Please help with the following.\n\n{query}",
    "Task: {query}",
    "{query}\n\nAnswer concisely.",
    "Here is a request:\n{query}",
    "Instruction: {query}",
)


def _fill(pattern: str, text: str) -> str:
    # str.replace, as in templates.py: the user's text may hold braces.
    return pattern.replace("{query}", text)


def template_pool(template: str) -> list[str]:
    """The phrasings augmentation draws from for ``data.template``, without the one in use."""
    if template == "chat":
        return [w for w in CHAT_WRAPPER_POOL if w != "{query}"]
    current = SEED_TEMPLATE if template == "seed" else template
    return [t for t in SEED_TEMPLATE_POOL if t != current]


def _with_wrapped_last_user(sample: Sample, wrapper: str) -> Sample:
    last = max(i for i, m in enumerate(sample.messages) if m["role"] == "user")
    messages = [dict(m) for m in sample.messages]
    messages[last]["content"] = _fill(wrapper, messages[last]["content"])
    return Sample(messages, sample.source)


def _alternative(sample: Sample, template: str, phrasing: str, system_prompt: str) -> tuple[Sample, str]:
    """The sample and template that render ``sample`` with ``phrasing`` instead of ``template``."""
    if template == "chat":
        return _with_wrapped_last_user(sample, phrasing), "chat"
    # A custom template that shows {system} keeps showing it: pool phrasings have no slot for it.
    if template != "seed" and "{system}" in template and (sample.system or system_prompt):
        phrasing = "{system}\n\n" + phrasing
    return sample, phrasing


def augment_examples(
    samples: list[Sample],
    examples: list[Example],
    tokenizer: Any,
    template: str,
    fraction: float,
    seed: int,
    epoch: int,
    max_length: int,
    system_prompt: str = "",
) -> tuple[list[Example], int]:
    """This epoch's examples with ``round(fraction * n)`` of them re-rendered in another phrasing.

    ``samples[i]`` is the sample ``examples[i]`` was tokenized from (with ``template``, ``max_length``
    and ``system_prompt``). The choice of examples and phrasings depends only on ``(seed, epoch)``.
    Returns a new list of the same length and order, and the number of examples replaced: a
    re-rendering whose prompt no longer fits ``max_length`` keeps the original example and is not
    counted. ``fraction == 0`` returns ``examples`` itself and 0.
    """
    if not 0.0 <= fraction <= 1.0:
        raise DeftuneError(f"The template augmentation fraction must be in [0, 1], got {fraction}")
    if len(samples) != len(examples):
        raise DeftuneError(
            f"augment_examples needs one sample per example, got {len(samples)} samples for "
            f"{len(examples)} examples"
        )
    count = round(fraction * len(examples))
    if count == 0:
        return examples, 0
    pool = template_pool(template)
    rng = random.Random(f"deftune-augment:{seed}:{epoch}")
    chosen = sorted(rng.sample(range(len(examples)), count))
    out = list(examples)
    replaced = 0
    for i in chosen:
        sample, alt_template = _alternative(samples[i], template, rng.choice(pool), system_prompt)
        # Render first so that a template error surfaces; after it, tokenize_samples only raises
        # when the prompt does not fit max_length (every sample of its one-sample list skipped).
        render(sample, tokenizer, alt_template, system_prompt)
        try:
            new, _ = tokenize_samples([sample], tokenizer, alt_template, max_length, system_prompt)
        except DeftuneError:
            continue
        out[i] = new[0]
        replaced += 1
    return out, replaced


def example_sample_index(samples: list[Sample], examples: list[Example]) -> list[int]:
    """For each example, the index of the sample it came from.

    ``tokenize_samples`` keeps the samples' order and drops only those too long, so the examples are
    matched in order by their ``source`` (a record's location, unique per record).
    """
    if len(samples) == len(examples):
        return list(range(len(samples)))
    index: list[int] = []
    j = 0
    for ex in examples:
        while j < len(samples) and samples[j].source != ex.source:
            j += 1
        if j == len(samples):
            raise DeftuneError(f"{ex.source}: example does not match any remaining sample (order changed?)")
        index.append(j)
        j += 1
    return index


def epoch_examples(
    data: PreparedData,
    tokenizer: Any,
    data_cfg: DataConfig,
    seed: int,
    epoch: int,
    *,
    fraction: float | None = None,
) -> tuple[list[Example], int]:
    """The training examples for ``epoch`` with template augmentation, and how many were re-rendered.

    Reads ``template``, ``max_length`` and ``system_prompt`` from ``data_cfg``; ``fraction`` defaults
    to ``data_cfg.augment_fraction``. The caller logs the count.
    """
    if fraction is None:
        fraction = data_cfg.augment_fraction
    if fraction == 0 or not data.train:
        return data.train, 0
    index = data.train_sample_index or example_sample_index(data.train_samples, data.train)
    samples = [data.train_samples[j] for j in index]
    return augment_examples(
        samples,
        data.train,
        tokenizer,
        data_cfg.template,
        fraction,
        seed,
        epoch,
        data_cfg.max_length,
        data_cfg.system_prompt,
    )
