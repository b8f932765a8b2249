"""The data stage: read records, normalise their shape, render a template, tokenize, split, batch.

``prepare_data(cfg.data, tokenizer)`` runs the whole chain:

    read_records -> to_samples -> split_train_eval -> cap -> tokenize_samples  (train and eval)

Per epoch, ``epoch_examples`` re-renders a fraction of the training examples with other templates
(``deftune.data.augment``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deftune.config import DataConfig
from deftune.data.augment import (
    CHAT_WRAPPER_POOL,
    SEED_TEMPLATE_POOL,
    augment_examples,
    epoch_examples,
    example_sample_index,
    template_pool,
)
from deftune.data.collate import batches, pack_collate, pack_examples, pad_collate
from deftune.data.formats import Sample, detect_format, to_samples
from deftune.data.readers import read_records
from deftune.data.split import split_train_eval
from deftune.data.templates import SEED_TEMPLATE, prompt_for_generation, render
from deftune.data.tokenize import (
    IGNORE_INDEX,
    DataStats,
    Example,
    encode_prompt,
    ensure_pad_token,
    tokenize_samples,
)

__all__ = [
    "CHAT_WRAPPER_POOL",
    "IGNORE_INDEX",
    "SEED_TEMPLATE",
    "SEED_TEMPLATE_POOL",
    "DataStats",
    "Example",
    "PreparedData",
    "Sample",
    "augment_examples",
    "batches",
    "detect_format",
    "encode_prompt",
    "ensure_pad_token",
    "epoch_examples",
    "example_sample_index",
    "pack_collate",
    "pack_examples",
    "pad_collate",
    "prepare_data",
    "prompt_for_generation",
    "read_records",
    "render",
    "split_train_eval",
    "template_pool",
    "to_samples",
    "tokenize_samples",
]


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
