"""Batch examples: right padding, or packing several examples into one row.

Packing (as in Krell et al. 2021, "Efficient Sequence Packing without Cross-contamination") places
examples back to back and gives each its own ``position_ids`` starting at 0, with no ``attention_mask``.
transformers 5 (``masking_utils.find_packed_sequence_indices``) reads a drop in
``position_ids`` as a sequence boundary and builds a block-diagonal causal mask for sdpa / eager /
flex, and flash-attention uses the same positions for its varlen kernels. Two conditions hold for this:

- the forward pass must get ``position_ids`` and no ``attention_mask``;
- it must run without a KV cache (``use_cache=False``): with a cache the detection is skipped and the
  examples of a row attend to one another.

Padding-free (``data.padding_free``, :func:`padfree_collate`): the packs of a micro-batch are laid end to
end in one row with no pad tokens at all, and ``cu_seqlens`` marks where each example starts; attention
runs per example (:mod:`deftune.kernels.varlen`), so no compute is spent on padding and no T x T mask is
built.
"""

from __future__ import annotations

import random

import torch

from deftune.data.tokenize import IGNORE_INDEX, Example
from deftune.errors import DeftuneError


def pad_collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids``, ``labels`` (-100 on pads), ``attention_mask``."""
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pack_examples(examples: list[Example], max_length: int) -> list[list[Example]]:
    """Greedy first-fit: each example, in order, joins the first pack it fits in (total <= max_length)."""
    packs: list[list[Example]] = []
    room: list[int] = []
    for ex in examples:
        n = len(ex.input_ids)
        if n > max_length:
            raise DeftuneError(f"{ex.source}: example of {n} tokens is longer than max_length={max_length}")
        for k, free in enumerate(room):
            if n <= free:
                packs[k].append(ex)
                room[k] -= n
                break
        else:
            packs.append([ex])
            room.append(max_length - n)
    return packs


def pack_collate(
    packs: list[list[Example]], pad_id: int, max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """Rows of packed examples: ``input_ids``, ``labels``, ``position_ids``; no ``attention_mask``.

    Positions restart at 0 for every example; padding continues the last example's count so it adds
    no boundary (causal attention keeps real tokens from seeing it, and its labels are -100). The first
    label of each example is -100, so a shifted loss never predicts one example from the one before.
    Rows are padded to ``max_length`` when given (fixed shapes), else to the longest row.
    """
    lengths = [sum(len(ex.input_ids) for ex in pack) for pack in packs]
    width = max_length if max_length is not None else max(lengths)
    if max(lengths) > width:
        raise DeftuneError(f"A pack of {max(lengths)} tokens does not fit max_length={width}")
    input_ids = torch.full((len(packs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(packs), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(packs), width), dtype=torch.long)
    for row, pack in enumerate(packs):
        start = 0
        for ex in pack:
            n = len(ex.input_ids)
            input_ids[row, start : start + n] = torch.tensor(ex.input_ids, dtype=torch.long)
            labels[row, start : start + n] = torch.tensor(ex.labels, dtype=torch.long)
            labels[row, start] = IGNORE_INDEX
            position_ids[row, start : start + n] = torch.arange(n)
            start += n
        last = len(pack[-1].input_ids) if pack else 0
        position_ids[row, start:] = torch.arange(last, last + width - start)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def padfree_collate(packs: list[list[Example]]) -> dict[str, torch.Tensor]:
    """One row holding every example of ``packs`` back to back, no padding: ``input_ids``, ``labels``,
    ``position_ids`` [1, N] (positions restart at 0 per example, each example's first label is -100 as in
    :func:`pack_collate`) and ``cu_seqlens`` [n + 1] (int32, on the host: example e is tokens
    cu_seqlens[e] .. cu_seqlens[e + 1])."""
    examples = [ex for pack in packs for ex in pack]
    if not examples:
        raise DeftuneError("padding-free batch without examples")
    ids, labels, positions, bounds = [], [], [], [0]
    for ex in examples:
        n = len(ex.input_ids)
        ids.extend(ex.input_ids)
        labels.extend([IGNORE_INDEX, *ex.labels[1:]])
        positions.extend(range(n))
        bounds.append(bounds[-1] + n)
    return {"input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "cu_seqlens": torch.tensor(bounds, dtype=torch.int32)}


def batches(
    examples: list[Example],
    micro_batch: int,
    pad_id: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    packing: bool = False,
    max_length: int | None = None,
    padding_free: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """One epoch of micro-batches, the same for the same ``(seed, epoch)``.

    Without packing each batch holds ``micro_batch`` examples padded to the longest; with packing the
    (shuffled) examples are packed into rows of ``max_length`` tokens and each batch holds
    ``micro_batch`` rows. The last batch may be smaller. ``padding_free`` (with packing): the same packs
    per batch, laid end to end in one row without padding (:func:`padfree_collate`).
    """
    if micro_batch < 1:
        raise DeftuneError(f"micro_batch must be >= 1, got {micro_batch}")
    order = list(examples)
    if shuffle:
        # A string seed is hashed with SHA-512 by random.Random: stable across processes and machines.
        random.Random(f"deftune:{seed}:{epoch}").shuffle(order)
    if not packing:
        return [pad_collate(order[i : i + micro_batch], pad_id) for i in range(0, len(order), micro_batch)]
    if max_length is None:
        raise DeftuneError("packing needs max_length (the row length)")
    packs = pack_examples(order, max_length)
    if padding_free:
        return [padfree_collate(packs[i : i + micro_batch]) for i in range(0, len(packs), micro_batch)]
    return [
        pack_collate(packs[i : i + micro_batch], pad_id, max_length)
        for i in range(0, len(packs), micro_batch)
    ]
