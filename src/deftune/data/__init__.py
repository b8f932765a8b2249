"""The data stage: read records, normalise their shape, render a template, tokenize, split, batch.

``prepare_data(cfg.data, tokenizer)`` runs the whole chain:

    read_records -> to_samples -> split_train_eval -> cap  (read_samples: no tokenizer needed)
    -> tokenize_samples  (train and eval)

Per epoch, ``epoch_examples`` re-renders a fraction of the training examples with other templates
(``deftune.data.augment``).
"""

from __future__ import annotations

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
from deftune.data.prepare import SplitSamples, prepare_data, read_samples
from deftune.data.readers import read_records
from deftune.data.split import split_train_eval
from deftune.data.templates import SEED_TEMPLATE, prompt_for_generation, render
from deftune.data.tokenize import (
    IGNORE_INDEX,
    DataStats,
    Example,
    PreparedData,
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
    "SplitSamples",
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
    "read_samples",
    "render",
    "split_train_eval",
    "template_pool",
    "to_samples",
    "tokenize_samples",
]
