"""The data stage end to end for a recipe's ``data`` section, in two steps: ``read_samples`` (files ->
checked samples; needs no tokenizer, so a run reads and checks its data before loading the model) and
``prepare_data`` (samples -> tokenized examples)."""

from __future__ import annotations

from typing import NamedTuple

from deftune.config import DataConfig
from deftune.data.augment import example_sample_index
from deftune.data.formats import Sample, to_samples
from deftune.data.readers import read_records
from deftune.data.split import split_train_eval
from deftune.data.tokenize import PreparedData, tokenize_samples
from deftune.errors import DeftuneError


class SplitSamples(NamedTuple):
    """A recipe's samples after reading, checking, splitting and capping; not tokenized yet."""

    train: list[Sample]
    eval: list[Sample]


def read_samples(cfg: DataConfig) -> SplitSamples:
    """Read and normalise the recipe's data, split off the eval part and cap both parts.

    Every malformed record is an error naming its file and line. Eval comes from ``cfg.eval`` when set,
    else ``cfg.eval_fraction`` of the training samples is held out with ``cfg.split_seed``.
    ``max_train_records`` / ``max_eval_records`` keep the first N samples of each part after the split.
    Training data whose every response is empty is refused here (there is nothing to learn).
    """
    train_samples = to_samples(read_records(cfg.train), cfg.format)
    if cfg.eval:
        eval_samples = to_samples(read_records(cfg.eval), cfg.format)
    else:
        train_samples, eval_samples = split_train_eval(train_samples, cfg.eval_fraction, cfg.split_seed)
    if cfg.max_train_records > 0:
        train_samples = train_samples[: cfg.max_train_records]
    if cfg.max_eval_records > 0:
        eval_samples = eval_samples[: cfg.max_eval_records]
    if train_samples and all(s.has_empty_response for s in train_samples):
        raise DeftuneError(f"{cfg.train}: every training record has an empty response (first: "
                           f"{train_samples[0].source}): there is no answer to learn; fill in the responses")
    return SplitSamples(train_samples, eval_samples)


def prepare_data(cfg: DataConfig, tokenizer, samples: SplitSamples | None = None) -> PreparedData:
    """Tokenize the recipe's samples (``samples`` from ``read_samples``; read here when None).

    Samples skipped for length or for an empty response stay in ``*_samples`` (scoring by generation
    does not need them to fit), but are counted in ``stats``.
    """
    train_samples, eval_samples = samples if samples is not None else read_samples(cfg)
    train, train_stats = tokenize_samples(
        train_samples, tokenizer, cfg.template, cfg.max_length, cfg.system_prompt
    )
    evaluation, eval_stats = tokenize_samples(
        eval_samples, tokenizer, cfg.template, cfg.max_length, cfg.system_prompt
    )
    stats = {"train": train_stats, "eval": eval_stats}
    return PreparedData(
        train, evaluation, train_samples, eval_samples, stats, example_sample_index(train_samples, train)
    )
