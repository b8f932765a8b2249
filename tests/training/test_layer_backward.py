"""Layer selection: with adapters only on the top layer, backward never runs through the layers below.

Autograd computes only what leads to a tensor that requires grad. With frozen embeddings and nothing
trainable below layer L, the hidden states entering L do not require grad, so no backward node exists
for layers < L and backward costs only the top of the stack.
"""

import pytest
import torch
import transformers
from conftest import save_tiny_llama, tiny_recipe

from deftune.api import train
from deftune.models.arch import decoder_layers
from deftune.training import loop

LAYERS = 4


class BackwardCounter(loop.Callback):
    """Counts, per decoder layer, backward calls (full backward hook) and gradients reaching its output."""

    name = "backward_counter"

    def on_train_start(self, trainer):
        self.module_calls = [0] * LAYERS
        self.output_grads = [0] * LAYERS
        for i, layer in enumerate(decoder_layers(trainer.model)):
            layer.register_full_backward_hook(self._module_hook(i))
            layer.register_forward_hook(self._output_hook(i))

    def _module_hook(self, i):
        def hook(module, grad_input, grad_output):
            self.module_calls[i] += 1
        return hook

    def _output_hook(self, i):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if torch.is_grad_enabled() and hidden.requires_grad:
                hidden.register_hook(lambda grad: self.output_grads.__setitem__(i, self.output_grads[i] + 1))
        return hook


@pytest.fixture(scope="module")
def four_layer_llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama4"), layers=LAYERS)


def _counts(model_dir, data, out, monkeypatch, method, checkpointing):
    counter = BackwardCounter()

    class CountingTrainer(loop.Trainer):
        def __init__(self, *args, callbacks=(), **kwargs):
            super().__init__(*args, callbacks=[*callbacks, counter], **kwargs)

    monkeypatch.setattr(loop, "Trainer", CountingTrainer)
    recipe = tiny_recipe(model_dir, data, out, method=method, adapter={"targets": "all-linear", "layers": "top:1"},
                         train={"max_steps": 1, "gradient_checkpointing": checkpointing})
    train(recipe, progress=False)
    return counter


def _assert_top_only(counter):
    top = LAYERS - 1
    assert counter.module_calls[:top] == [0] * top, counter.module_calls
    assert counter.output_grads[:top] == [0] * top, counter.output_grads
    assert counter.module_calls[top] > 0 and counter.output_grads[top] > 0


@pytest.mark.parametrize("method", ["lora", "full"])
def test_backward_skips_layers_below_the_adapters(four_layer_llama, copy_task_file, tmp_path, monkeypatch, method):
    _assert_top_only(_counts(four_layer_llama, copy_task_file, tmp_path / "run", monkeypatch, method, False))


# transformers >= 5 `gradient_checkpointing_enable` makes the embedding output require grad, which would
# drag backward through every layer; deftune's non-reentrant checkpointing does not need that, so api.train
# removes the hook and backward must still stop at the lowest trainable layer.
@pytest.mark.parametrize("method", ["lora", "full"])
def test_backward_skips_layers_below_the_adapters_with_checkpointing(four_layer_llama, copy_task_file, tmp_path,
                                                                     monkeypatch, method):
    _assert_top_only(_counts(four_layer_llama, copy_task_file, tmp_path / "run", monkeypatch, method, True))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_disabling_input_grads_restores_top_only_backward(four_layer_llama, copy_task_file, tmp_path, monkeypatch,
                                                          method):
    """The proposed fix, applied around gradient_checkpointing_enable: same losses, top-only backward."""
    import json

    original = transformers.PreTrainedModel.gradient_checkpointing_enable

    def enable_then_drop_input_grads(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.disable_input_require_grads()

    monkeypatch.setattr(transformers.PreTrainedModel, "gradient_checkpointing_enable",
                        enable_then_drop_input_grads)
    _assert_top_only(_counts(four_layer_llama, copy_task_file, tmp_path / "ckpt", monkeypatch, method, True))
    _counts(four_layer_llama, copy_task_file, tmp_path / "plain", monkeypatch, method, False)

    def loss(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return next(r["loss"] for r in rows if "loss" in r)

    assert loss(tmp_path / "ckpt") == pytest.approx(loss(tmp_path / "plain"), abs=1e-5)
