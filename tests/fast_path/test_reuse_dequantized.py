"""``train.reuse_dequantized``: in an offloaded, patched 4-bit model a layer's recompute hands its
dequantized weights to its backward (:func:`deftune.kernels.lora_linear.keep_dequantized_on_recompute`),
with loss and gradients unchanged bit for bit."""

from __future__ import annotations

import pytest
import torch
import transformers
from fast_models import (  # noqa: F401 (reference_path_on_cpu: an autouse fixture)
    DEVICE,
    family_config,
    loss_and_grads,
    make_batch,
    reference_path_on_cpu,
)

from deftune.adapters.lora.model import attach_lora, lora_modules
from deftune.config import recipe_from_dict
from deftune.errors import DeftuneError
from deftune.fast_path import offload
from deftune.fast_path.patch import apply_fast_path
from deftune.kernels import lora_linear as ll
from deftune.models.quantize import NF4Linear, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _nf4_lora_model():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(family_config("llama"))
    quantize_model(model)
    attach_lora(model, "all-linear", "all", rank=4, alpha=8)
    for module in lora_modules(model).values():
        torch.nn.init.normal_(module.lora_B.weight, std=0.1)
    apply_fast_path(model, log=lambda _: None)
    return model.to(DEVICE).train()


def test_reuse_dequantized_skips_the_backward_dequantization_after_a_recompute(monkeypatch):
    """With keep_dequantized, each projection a recompute ran (q, k, v, o, gate, up; not down, which the
    recompute never reaches) is not dequantized again in backward; layer 0's q/k/v need no dx (the
    embedding is frozen), so their kept weights are dropped unused. Loss and gradients are unchanged and
    nothing stays kept after the step."""
    calls = []
    real = NF4Linear.dequantize
    monkeypatch.setattr(NF4Linear, "dequantize", lambda self: calls.append(1) or real(self))
    batch = make_batch()
    counts, results = {}, {}
    for keep in (False, True):
        model = _nf4_lora_model()
        assert offload.wrap_decoder_layers(model, keep_dequantized=keep) == 2
        calls.clear()
        results[keep] = loss_and_grads(model, batch)
        counts[keep] = len(calls)
        assert len(ll._KEPT_WEIGHTS) == 0
    # forward 2 x 7, recompute 2 x 6, backward 2 x 7 minus layer 0's q/k/v (no dx wanted there)
    assert counts[False] == 14 + 12 + 11
    assert counts[True] == counts[False] - 6 - 3
    assert results[True][0] == results[False][0]
    for name, grad in results[False][2].items():
        assert torch.equal(results[True][2][name], grad), name


def test_reuse_dequantized_is_checked():
    with pytest.raises(DeftuneError, match="train.reuse_dequantized"):
        recipe_from_dict({"train": {"reuse_dequantized": True, "offload_activations": True},
                          "model": {"fast": True}})
    with pytest.raises(DeftuneError, match="train.reuse_dequantized"):
        recipe_from_dict({"train": {"reuse_dequantized": True}, "model": {"fast": True, "quantize": "nf4"}})
    recipe = recipe_from_dict({"train": {"reuse_dequantized": True, "offload_activations": True},
                               "model": {"fast": True, "quantize": "nf4"}})
    assert recipe.train.reuse_dequantized


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reuse_dequantized_on_cuda():
    """The same on the card (side-stream offload, Triton NF4 kernel): a step with the kept weights gives the
    loss and gradients of a step without them, bit for bit."""
    results = []
    for keep in (False, True):
        model = _nf4_lora_model()
        assert offload.enable_offloaded_checkpointing(model, torch.device("cuda"), keep_dequantized=keep) == 2
        results.append(loss_and_grads(model, make_batch()))
        assert len(ll._KEPT_WEIGHTS) == 0
    assert results[0][0] == results[1][0]
    for name, grad in results[0][2].items():
        assert torch.equal(results[1][2][name], grad), name
