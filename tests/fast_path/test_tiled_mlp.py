"""MLP tiling (``train.mlp_tile_tokens``, :mod:`deftune.fast_path.tiled_mlp`): the same values in less
memory, alone, over the fast path and inside the offloaded layer checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
from fast_models import (  # noqa: F401 (reference_path_on_cpu: an autouse fixture)
    assert_same_step,
    lora_model,
    make_batch,
    reference_path_on_cpu,
)

from deftune.config import recipe_from_dict
from deftune.errors import DeftuneError
from deftune.fast_path import offload
from deftune.fast_path.patch import apply_fast_path
from deftune.fast_path.tiled_mlp import tile_mlps
from deftune.training.loss import response_loss_sum

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("fast,offloaded", [(False, False), (True, False), (True, True)])
def test_tiled_mlp_keeps_loss_and_gradients(fast, offloaded):
    """MLP tiling (train.mlp_tile_tokens) changes no value: loss and every LoRA gradient equal the
    untiled model's, alone, over the fast path, and nested in the offloaded layer checkpoint."""
    plain = lora_model("llama").train()
    tiled = copy.deepcopy(plain)
    if fast:  # each patched itself: a copy of a patched model is not registered as one (patch.is_fast)
        for model in (plain, tiled):
            apply_fast_path(model, log=lambda _: None)
    if offloaded:
        offload.wrap_decoder_layers(tiled)
    assert tile_mlps(tiled, 5) == 2  # 3 x 13 = 39 tokens -> 8 tiles
    batch = make_batch()
    assert_same_step(plain, tiled, batch, rel=1e-6, atol=1e-6, rtol=1e-5)


def test_tiled_mlp_never_holds_the_whole_sequence_intermediate():
    """Saved for backward while the tiled model runs forward: nothing of size tokens x intermediate."""
    model = lora_model("llama").train()
    tile_mlps(model, 4)
    batch = make_batch()
    tokens = batch["input_ids"].numel()
    intermediate = model.config.intermediate_size
    sizes = []

    def pack(t):
        if t.dim() and t.shape[-1] == intermediate:  # MLP intermediates (gate / up / act outputs)
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        response_loss_sum(model, batch)
    assert max(sizes, default=0) < tokens * intermediate
    # Without tiling the MLP saves its [tokens, intermediate] activations.
    untiled = lora_model("llama").train()
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        response_loss_sum(untiled, batch)
    assert max(sizes) >= tokens * intermediate


def test_mlp_tile_tokens_is_checked():
    with pytest.raises(DeftuneError, match="train.mlp_tile_tokens"):
        recipe_from_dict({"train": {"mlp_tile_tokens": -1}})
