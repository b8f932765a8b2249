"""The method registry: a new method is one module + one registry line, and every entry point uses it."""

from __future__ import annotations

import pytest
import torch
import transformers
from toy_method import NormTuning, _norms

import deftune
from deftune.adapters import methods
from deftune.config import recipe_from_dict
from deftune.errors import DeftuneError


@pytest.fixture
def toy():
    methods.register(NormTuning())  # the one registry line
    yield
    methods._REGISTRY.pop("toy", None)


def _overrides(model_dir, data_file, out):
    return [f"model.path={model_dir}", f"data.train={data_file}", f"output_dir={out}", "device=cpu",
            "data.max_length=64", "data.eval_fraction=0.2", "train.lr=5e-3", "train.micro_batch=4",
            "train.grad_accum=2", "train.max_steps=6", "train.warmup=1", "eval.samples=0",
            "monitor.tensorboard=false", "monitor.report=false"]


def test_a_registered_toy_method_trains_saves_loads_and_merges(toy, tiny_llama_dir, copy_task_file, tmp_path):
    summary = deftune.train(None, ["method=toy", *_overrides(tiny_llama_dir, copy_task_file, tmp_path / "run")],
                            progress=False)
    assert summary.method == "toy" and summary.steps == 6
    assert (tmp_path / "run" / "norms" / "norms.safetensors").is_file()
    assert summary.after["eval_loss"] < summary.before["eval_loss"]

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tuned, _, recipe = deftune.api.load_for_inference(summary.run_dir, "cpu")
    assert recipe.method == "toy"
    base_norms, tuned_norms = _norms(base), _norms(tuned)
    assert any(not torch.equal(base_norms[n].weight, tuned_norms[n].weight.to(base_norms[n].weight.dtype))
               for n in base_norms)
    merged_dir = deftune.merge(summary.run_dir, str(tmp_path / "merged"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir)
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, tuned(ids).logits, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-5)


def test_unknown_method_names_the_registered_ones_and_close_matches():
    with pytest.raises(DeftuneError, match=r"method must be one of lora, full, esft, expert-lora.*did you mean lora"):
        recipe_from_dict({"method": "loraa"})


def test_a_registered_method_is_accepted_by_the_config(toy):
    assert recipe_from_dict({"method": "toy"}).method == "toy"
    methods._REGISTRY.pop("toy")
    with pytest.raises(DeftuneError, match="method must be one of"):
        recipe_from_dict({"method": "toy"})


def test_quantized_base_only_for_methods_that_train_adapters():
    with pytest.raises(DeftuneError, match="model.quantize=nf4 freezes the base weights.*lora, expert-lora"):
        recipe_from_dict({"method": "full", "model": {"quantize": "nf4"}})
