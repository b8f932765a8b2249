"""The training loss, computed in one place so distillation, EWC and fused kernels change one function.

Causal LM cross-entropy on response tokens only:

    L = - sum_{t : y_t != -100} log p(y_t | x_<t)

Summed here and divided by the token count of the whole optimizer step (all accumulated micro-batches),
so every response token weighs the same however the batch is split. The LM head runs only on positions
that carry a label: prompt tokens are -100, and skipping their logits saves most of the head's work on
instruction data (the head of a 49k-word vocabulary is a fifth of SmolLM2's compute).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deftune.fast_path.patch import fast_loss_sum, is_fast
from deftune.kernels.varlen import segment_mask
from deftune.models.surgery import decoder_backbone, logits_from_hidden

IGNORE_INDEX = -100


def backbone_inputs(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "position_ids")
    inputs = {k: batch[k] for k in keys if k in batch}
    if "cu_seqlens" in batch:
        # Padding-free row: the example boundaries travel to every attention module as its mask argument.
        inputs["attention_mask"] = segment_mask(batch["cu_seqlens"])
    return inputs


def response_loss_sum(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Sum of token cross-entropies over labelled positions, and how many there were."""
    backbone = decoder_backbone(model)
    labels = batch["labels"]
    # Found on the host by the trainer (train.loop.move) when it can; else here, with one GPU sync, taken
    # before the forward is queued: there the GPU has nothing to drain, after it the host would wait for
    # the whole forward and lose its lead over the GPU.
    target_at, hidden_at = batch.get("label_positions") or labelled_positions(labels)
    hidden = backbone(**backbone_inputs(batch), use_cache=False).last_hidden_state
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, hidden_at)
    # The backward needs neither (index_select keeps only the index; the final RMSNorm keeps its input):
    # freed now, it is not held through the head and the loss, where a step's memory peaks.
    del hidden
    targets = labels.reshape(-1).index_select(0, target_at)
    if is_fast(model):
        # model.fast: the head and the loss fused (deftune.kernels.linear_ce), no logits matrix kept.
        loss = fast_loss_sum(model, picked, targets)
        if loss is not None:
            # The count from the selection's shape: int(keep.sum()) would wait on the GPU a second time.
            return loss, picked.shape[0]
    logits = logits_from_hidden(model, picked).float()
    loss = F.cross_entropy(logits, targets, reduction="sum")
    return loss, picked.shape[0]


def labelled_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (into ``labels.reshape(-1)``) of the labelled tokens a position predicts, and of the
    positions predicting them (one before each).

    Position t predicts token t+1, so a row's first token is never a target; packed rows label every
    sample's first token -100, so no sample is asked to predict its neighbour's first token. One
    ``nonzero`` (the GPU waits once) and index_select afterwards: boolean-mask indexing of the hidden
    states and of the targets would wait twice in forward and once more in backward (its index_put).
    """
    valid = labels != IGNORE_INDEX
    valid[:, 0] = False
    target_at = valid.reshape(-1).nonzero().squeeze(1)
    return target_at, target_at - 1


def count_label_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
