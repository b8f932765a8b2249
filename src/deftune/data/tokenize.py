"""Tokenize rendered samples into ``input_ids`` with response-only ``labels``.

Supervised fine-tuning loss is taken on the answer only (as in InstructGPT, Ouyang et al. 2022):

    loss = -(1 / |R|) * sum_{t in R} log p(x_t | x_<t),   R = response tokens (+ the closing EOS)

so prompt tokens carry the ignore label -100 and response tokens their own ids. Each segment is
tokenized on its own (``add_special_tokens=False``) so that the prompt/response boundary is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deftune.data.formats import Sample
from deftune.data.templates import prompt_for_generation, render
from deftune.errors import DeftuneError

IGNORE_INDEX = -100


@dataclass
class Example:
    """One tokenized sample: ``labels[t]`` is ``input_ids[t]`` on trained tokens and -100 elsewhere."""

    input_ids: list[int]
    labels: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataStats:
    """Counts from tokenizing one split, printed before training."""

    records: int = 0
    examples: int = 0
    truncated: int = 0
    skipped_prompt_too_long: int = 0
    skipped_empty_response: int = 0
    tokens: int = 0
    label_tokens: int = 0

    def summary(self) -> str:
        text = (
            f"{self.records} records -> {self.examples} examples, {self.tokens:,} tokens "
            f"({self.label_tokens:,} trained on)"
        )
        if self.truncated:
            text += f", {self.truncated} truncated to max_length"
        if self.skipped_prompt_too_long:
            text += f", {self.skipped_prompt_too_long} skipped (prompt longer than max_length)"
        if self.skipped_empty_response:
            text += f", {self.skipped_empty_response} skipped (empty response)"
        return text


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def adds_bos(tokenizer: Any) -> bool:
    """True when the tokenizer's own encode starts with BOS (Llama-style), so we must add it ourselves."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _prefix(tokenizer: Any, template: str) -> list[int]:
    # Chat templates write their own BOS text (e.g. <|begin_of_text|>); adding one would double it.
    return [tokenizer.bos_token_id] if template != "chat" and adds_bos(tokenizer) else []


def encode_prompt(
    sample_or_query: Sample | str, tokenizer: Any, template: str, system_prompt: str = ""
) -> list[int]:
    """Token ids of the generation prompt, built exactly as the prompt side of a training example."""
    text = prompt_for_generation(sample_or_query, tokenizer, template, system_prompt)
    return _prefix(tokenizer, template) + _encode(tokenizer, text)


def tokenize_samples(
    samples: list[Sample], tokenizer: Any, template: str, max_length: int, system_prompt: str = ""
) -> tuple[list[Example], DataStats]:
    """Tokenize samples into examples of at most ``max_length`` tokens, with statistics.

    The closing EOS is appended (and trained on) unless the rendering's last response already holds
    it, as chat templates often do. Over-long examples are cut at the end (response side); a sample
    whose first prompt plus one response token does not fit is skipped, and so is a sample with an empty
    response (an assistant turn holding only whitespace): both are counted in the stats. Skipping every
    sample is an error saying why.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    prefix = _prefix(tokenizer, template)
    stats = DataStats(records=len(samples))
    examples: list[Example] = []
    shortest_prompt: int | None = None
    for sample in samples:
        if sample.has_empty_response:
            stats.skipped_empty_response += 1
            continue
        input_ids, labels = list(prefix), [IGNORE_INDEX] * len(prefix)
        first_prompt = 0
        response_ids: list[int] = []
        for k, (prompt, response) in enumerate(render(sample, tokenizer, template, system_prompt)):
            prompt_ids, response_ids = _encode(tokenizer, prompt), _encode(tokenizer, response)
            input_ids += prompt_ids + response_ids
            labels += [IGNORE_INDEX] * len(prompt_ids) + response_ids
            if k == 0:
                first_prompt = len(input_ids) - len(response_ids)
        if eos is not None and eos not in response_ids:
            input_ids.append(eos)
            labels.append(eos)
        shortest_prompt = first_prompt if shortest_prompt is None else min(shortest_prompt, first_prompt)
        if first_prompt + 1 > max_length:
            stats.skipped_prompt_too_long += 1
            continue
        if len(input_ids) > max_length:
            input_ids, labels = input_ids[:max_length], labels[:max_length]
            stats.truncated += 1
        examples.append(Example(input_ids, labels, sample.source))
        stats.tokens += len(input_ids)
        stats.label_tokens += sum(label != IGNORE_INDEX for label in labels)
    stats.examples = len(examples)
    if samples and not examples and not stats.skipped_prompt_too_long:
        raise DeftuneError(f"Every sample has an empty response (first: {samples[0].source}): there is no "
                           "answer to learn; fill in the responses")
    if samples and not examples:
        raise DeftuneError(
            f"Every sample's prompt is too long for data.max_length={max_length}: the shortest prompt "
            f"has {shortest_prompt} tokens (plus at least 1 response token). Raise data.max_length "
            "or shorten the prompts / system prompt."
        )
    return examples, stats


def ensure_pad_token(tokenizer: Any) -> str | None:
    """Give the tokenizer a pad token (its EOS) when it has none; returns a note saying so, else None.

    Padding positions are masked out of attention and loss, so reusing EOS is safe.
    """
    if getattr(tokenizer, "pad_token", None) is not None:
        return None
    if getattr(tokenizer, "eos_token", None) is None:
        raise DeftuneError(
            "The tokenizer has neither a pad token nor an EOS token, so batches cannot be padded; "
            "use a tokenizer that defines an EOS token"
        )
    tokenizer.pad_token = tokenizer.eos_token
    return f"The tokenizer has no pad token; using its EOS token {tokenizer.eos_token!r} for padding"


@dataclass
class PreparedData:
    """Tokenized train/eval examples, the samples they came from (for generation scoring) and stats.

    ``train_sample_index[i]`` is the index in ``train_samples`` of ``train[i]`` (samples skipped for
    length have no example); empty when not computed (then matched by source when needed).
    """

    train: list[Example]
    eval: list[Example]
    train_samples: list[Sample]
    eval_samples: list[Sample]
    stats: dict[str, DataStats] = field(default_factory=dict)
    train_sample_index: list[int] = field(default_factory=list)
