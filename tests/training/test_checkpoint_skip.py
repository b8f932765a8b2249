"""train.checkpoint_skip: the top N decoder layers keep their activations (run once), the others are
recomputed in backward (run twice); gradients are the same either way."""

from __future__ import annotations

import pytest
import torch
import transformers

from deftune.adapters.lora.model import attach_lora
from deftune.config import recipe_from_dict
from deftune.errors import DeftuneError
from deftune.fast_path import offload
from deftune.recipes import sft

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(layers: int = 3):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    attach_lora(model, "all-linear", "all", rank=4, alpha=8)
    return model.train()


def _run(model):
    calls = []
    for i, layer in enumerate(model.model.layers):
        # On the MLP inside the layer: a recompute calls the layer's function, not its hooks.
        layer.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return [calls.count(i) for i in range(len(model.model.layers))], grads


def _recipe(skip: int, offload_on: bool = False):
    return recipe_from_dict(
        {
            "train": {
                "gradient_checkpointing": True,
                "checkpoint_skip": skip,
                "offload_activations": offload_on,
            }
        }
    )


def test_skipped_top_layers_run_once_and_gradients_do_not_change():
    _, reference = _run(_model())
    model = _model()
    assert sft.enable_checkpointing(_recipe(1), model)
    counts, grads = _run(model)
    assert counts == [2, 2, 1]
    for name, g in reference.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_offloaded_checkpointing_keeps_the_top_layers_too():
    model = _model()
    assert offload.wrap_decoder_layers(model, keep_top=2) == 1
    counts, _ = _run(model)
    assert counts == [2, 1, 1]


def test_skip_larger_than_the_model_is_refused():
    with pytest.raises(DeftuneError, match="train.checkpoint_skip=4: the model has 3 decoder layers"):
        sft.enable_checkpointing(_recipe(4), _model())
    with pytest.raises(DeftuneError, match="train.checkpoint_skip"):
        recipe_from_dict({"train": {"checkpoint_skip": -1}})
