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

from deftune.models.patch import decoder_backbone, logits_from_hidden

IGNORE_INDEX = -100


def backbone_inputs(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "position_ids")
    inputs = {k: batch[k] for k in keys if k in batch}
    if "cu_seqlens" in batch:
        # Padding-free row: the example boundaries travel to every attention module as its mask argument.
        from deftune.kernels.varlen import segment_mask

        inputs["attention_mask"] = segment_mask(batch["cu_seqlens"])
    return inputs


def response_loss_sum(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Sum of token cross-entropies over labelled positions, and how many there were."""
    backbone = decoder_backbone(model)
    hidden = backbone(**backbone_inputs(batch), use_cache=False).last_hidden_state
    # Position t predicts token t+1; packed rows label every sample's first token -100, so the shift
    # never asks a sample to predict its neighbour's first token.
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    picked = hidden[:, :-1][keep]
    if getattr(model, "_deftune_fast", False):
        # model.fast: the head and the loss fused (deftune.kernels.linear_ce), no logits matrix kept.
        from deftune.kernels.patch import fast_loss_sum

        loss = fast_loss_sum(model, picked, targets[keep])
        if loss is not None:
            # The count from the selection's shape: int(keep.sum()) would wait on the GPU a second time.
            return loss, picked.shape[0]
    logits = logits_from_hidden(model, picked).float()
    loss = F.cross_entropy(logits, targets[keep], reduction="sum")
    return loss, picked.shape[0]


def count_label_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
