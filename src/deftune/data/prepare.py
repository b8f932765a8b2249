"""``prepare_data``: the data stage end to end for a recipe's ``data`` section."""

from __future__ import annotations

from deftune.config import DataConfig
from deftune.data.augment import example_sample_index
from deftune.data.formats import to_samples
from deftune.data.readers import read_records
from deftune.data.split import split_train_eval
from deftune.data.tokenize import PreparedData, tokenize_samples


def prepare_data(cfg: DataConfig, tokenizer) -> PreparedData:
    """Read, normalise, split and tokenize the recipe's data.

    Eval comes from ``cfg.eval`` when set, else ``cfg.eval_fraction`` of the training samples is held
    out with ``cfg.split_seed``. ``max_train_records`` / ``max_eval_records`` keep the first N samples
    of each part after the split. Samples skipped for length stay in ``*_samples`` (scoring by
    generation does not need them to fit), but are counted in ``stats``.
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
