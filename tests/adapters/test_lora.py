import math

import pytest
import torch
from torch import nn

from deftune.adapters.lora.layer import LoRALinear, lora_scaling
from deftune.adapters.lora.model import attach_lora, lora_modules, merge_lora
from deftune.errors import DeftuneError
from deftune.models.arch import linear_sites, parse_layers


def test_lora_forward_matches_formula():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = LoRALinear(base, rank=3, alpha=6.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 12)
    expected = base(x) + (alpha_over_r := 6.0 / 3) * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    assert alpha_over_r == layer.scaling
    torch.testing.assert_close(layer(x), expected)


def test_lora_starts_as_identity_and_rslora_scaling():
    base = nn.Linear(8, 8)
    layer = LoRALinear(base, rank=4, alpha=8.0)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), base(x))
    assert lora_scaling(8.0, 4, True) == pytest.approx(8.0 / math.sqrt(4))
    assert lora_scaling(8.0, 4, False) == pytest.approx(2.0)


def test_merged_linear_equals_adapter():
    torch.manual_seed(1)
    layer = LoRALinear(nn.Linear(10, 6), rank=2, alpha=4.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 10)
    torch.testing.assert_close(layer.merged_linear()(x), layer(x), atol=1e-5, rtol=1e-5)


def _tiny_llama(layers=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


def test_attach_by_role_and_layers_freezes_base():
    model = _tiny_llama(layers=4)
    spec = attach_lora(model, "attention", "top:2", rank=4, alpha=8)
    names = set(lora_modules(model))
    assert names == {f"model.layers.{i}.self_attn.{p}" for i in (2, 3) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert sorted(spec.module_names) == sorted(names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_presets_roles_and_names():
    model = _tiny_llama(layers=2)
    roles = {s.leaf: s.role for s in linear_sites(model)}
    assert roles == {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "o_proj": "attention",
                     "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    attach_lora(model, ["gate_proj", "down_proj"], [0], rank=2, alpha=2)
    assert set(lora_modules(model)) == {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"}


def test_bad_targets_and_layers_are_clear_errors():
    model = _tiny_llama(layers=2)
    with pytest.raises(DeftuneError, match="no linear module named qq_proj"):
        attach_lora(model, ["qq_proj"], "all", rank=2, alpha=2)
    with pytest.raises(DeftuneError, match="the model has 2 layers"):
        attach_lora(model, "attention", "top:5", rank=2, alpha=2)


def test_parse_layers_forms():
    assert parse_layers("top:4", 10) == [6, 7, 8, 9]
    assert parse_layers("bottom:2", 10) == [0, 1]
    assert parse_layers("2-4", 10) == [2, 3, 4]
    assert parse_layers([0, -1], 10) == [0, 9]
    assert parse_layers("1,3", 10) == [1, 3]
    with pytest.raises(ValueError):
        parse_layers("middle", 10)


def test_merge_lora_replaces_wrappers():
    model = _tiny_llama(layers=2)
    attach_lora(model, "all-linear", "all", rank=2, alpha=4)
    for module in lora_modules(model).values():
        nn.init.normal_(module.lora_B.weight, std=0.1)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
        assert merge_lora(model) == 14
        after = model(ids).logits
    assert not lora_modules(model)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
