"""The FISH mask: train only the elements with the largest empirical Fisher information.

Sung, Nair & Raffel 2021, "Training Neural Networks with Fixed Sparse Masks" (NeurIPS, arXiv:2111.09839):

    F(theta_i) = sum_{b=1..B} (dL_b / d theta_i)^2          mask = top-k of F over all trainable elements,
                                                             k = round(keep * N)

Here L_b is the mean response-token loss of training micro-batch b (the run's first B micro-batches, the
same ones step 1 trains on), one backward pass per micro-batch; the paper squares per-example gradients,
which costs one backward per example. The selection is global across tensors, so a tensor may keep all,
some or none of its elements.

Ties at the threshold are broken by seeded random keys, so the choice is deterministic (same seed, same
mask) yet not biased towards the first tensors. This matters for LoRA: B starts at zero, so every
gradient of A (dL/dA = s B^T dL/dh x^T) is exactly zero at step 0 and A's Fisher is 0. The FISH mask
therefore ranks B's elements first and keeps A elements only when k exceeds the number of non-zero B
scores, a random subset of A chosen by the seed; with small `keep` A is frozen altogether (B trains
against a fixed random A, as in LoRA-FA). Full fine-tuning has no such zero block.
"""

from __future__ import annotations

import torch
from torch import nn

from deftune.training.loop import autocast_context, move
from deftune.training.loss import response_loss_sum


def fisher_scores(model: nn.Module, params: dict[str, nn.Parameter], micro_batches, device: torch.device
                  ) -> dict[str, torch.Tensor]:
    """Accumulated squared gradients (float32, like each parameter) over ``micro_batches``.

    Runs in train mode (dropout as in training); gradients are cleared afterwards and the torch RNG state
    is restored, so the training run that follows is unchanged. Non-finite micro-batches are skipped.
    """
    scores = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    was_training = model.training
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    model.train()
    try:
        for batch in micro_batches:
            model.zero_grad(set_to_none=True)
            with autocast_context(device):
                loss_sum, count = response_loss_sum(model, move(batch, device))
            if count == 0 or not torch.isfinite(loss_sum):
                continue
            (loss_sum / count).backward()
            for name, p in params.items():
                if p.grad is not None:
                    scores[name].add_(p.grad.detach().float().square())
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return scores


def top_k_mask(scores: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` elements of the 1-D ``scores``: every element above the k-th largest
    value, then ties at that value chosen by random keys from ``seed`` (index order if keys tie too)."""
    scores = scores.detach().float().cpu().reshape(-1)
    n = scores.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    threshold = torch.kthvalue(scores, n - k + 1).values
    mask = scores > threshold
    need = k - int(mask.sum())
    tied = torch.nonzero(scores == threshold).squeeze(1)
    if need < tied.numel():
        keys = torch.rand(tied.numel(), generator=torch.Generator().manual_seed(seed))
        tied = tied[torch.argsort(keys, stable=True)[:need]]
    mask[tied] = True
    return mask
