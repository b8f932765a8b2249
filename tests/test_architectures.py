"""End-to-end LoRA / full tuning on tiny random models of every supported family (no downloads).

For each architecture a seeded 2-layer model (hidden 32) with the tiny test tokenizer is saved once
(module-scoped) and trained for a few steps with ``deftune.api.train``. The tests then check that

- the loss falls and adapters sit only on modules of the requested role (never on MoE routers/experts);
- the saved adapter loads in PEFT and gives the logits deftune's own loader gives;
- ``deftune.api.merge`` writes a plain model with the adapter's logits;
- layer selection (``top:1``) and ``method: full`` with a role preset touch only what they select.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import transformers

# tests/ is on sys.path (rootdir conftest): a module-scoped fixture cannot use the function-scoped
# tokenizer fixtures, so the factory is imported directly.
from conftest import make_tiny_tokenizer

from deftune import api
from deftune.config import recipe_from_dict
from deftune.models.arch import PRESETS, classify, linear_sites, num_layers, select_sites

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello"]
PROBE = "### Instruction:\ncopy: fox the dog\n### Response:\n"
TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
DENSE = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 128,
}
MOE_SMALL = {
    "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 128,
}


def _config(arch: str, vocab: int):
    T = transformers
    common = dict(vocab_size=vocab, **TOKENS)
    if arch == "llama":
        return T.LlamaConfig(**DENSE, **common)
    if arch == "qwen2":
        return T.Qwen2Config(**DENSE, **common)
    if arch == "qwen3":
        return T.Qwen3Config(**DENSE, head_dim=8, **common)
    if arch == "mistral":
        return T.MistralConfig(**DENSE, **common)
    if arch == "gemma":
        return T.GemmaConfig(**DENSE, head_dim=8, **common)
    if arch == "gemma2":
        return T.Gemma2Config(**DENSE, head_dim=8, **common)
    if arch == "deepseek_v3":
        return T.DeepseekV3Config(
            hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
            qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1,
            max_position_embeddings=128, **common,
        )
    if arch == "qwen3_moe":
        return T.Qwen3MoeConfig(
            **MOE_SMALL, head_dim=8, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
            **common,
        )
    if arch == "mixtral":
        return T.MixtralConfig(**MOE_SMALL, num_local_experts=8, num_experts_per_tok=2, **common)
    raise ValueError(arch)


# (architecture, adapter.targets, is MoE)
ARCHS = [
    ("llama", "all-linear", False),
    ("qwen2", "attention", False),
    ("qwen3", "mlp", False),
    ("mistral", "all-linear", False),
    ("gemma", "attention+mlp", False),
    ("gemma2", "mlp", False),
    ("deepseek_v3", "attention", True),
    ("qwen3_moe", "attention", True),
    ("mixtral", "attention", True),
]


def _write_data(path: Path, n: int = 40) -> Path:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        words = " ".join(rng.sample(WORDS, 3))
        rows.append({"query": f"copy: {words}", "response": words})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _save_base(folder: Path, arch: str) -> Path:
    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(arch, len(tokenizer)))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def _recipe(model_dir: Path, data: Path, out: Path, **over) -> dict:
    tree = {
        "method": "lora",
        "device": "cpu",
        "output_dir": str(out),
        "model": {"path": str(model_dir)},
        "data": {"train": str(data), "eval": "", "eval_fraction": 0.1, "max_length": 64},
        "adapter": {"targets": "all-linear", "layers": "all", "rank": 4, "alpha": 8.0},
        "train": {"max_steps": 10, "lr": 1e-2, "micro_batch": 4, "grad_accum": 1, "warmup": 0,
                  "schedule": "constant", "log_every": 1, "seed": 0},
        "eval": {"samples": 0, "show_examples": 0},
        "monitor": {"tensorboard": False, "report": False},
    }
    for section, values in over.items():
        if isinstance(values, dict):
            tree[section].update(values)
        else:
            tree[section] = values
    return tree


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _load_base(model_dir: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return _write_data(tmp_path_factory.mktemp("data") / "copy.jsonl")


@pytest.fixture(scope="module")
def probe_ids():
    return make_tiny_tokenizer()(PROBE, return_tensors="pt")["input_ids"]


@pytest.fixture(scope="module", params=ARCHS, ids=[a[0] for a in ARCHS])
def trained(request, tmp_path_factory, data_file):
    """One saved base model and one 10-step LoRA run per architecture."""
    arch, targets, moe = request.param
    root = tmp_path_factory.mktemp(arch)
    model_dir = _save_base(root / "base", arch)
    recipe = recipe_from_dict(_recipe(model_dir, data_file, root / "run", adapter={"targets": targets}))
    summary = api.train(recipe, progress=False)
    return {"arch": arch, "targets": targets, "moe": moe, "model_dir": model_dir,
            "run_dir": Path(summary.run_dir), "summary": summary, "root": root}


def _roles(targets: str) -> set[str]:
    roles: set[str] = set()
    for part in targets.split("+"):
        roles |= PRESETS[part]
    return roles


def test_lora_trains_and_targets_only_the_requested_role(trained):
    run_dir = trained["run_dir"]
    losses = _losses(run_dir)
    assert len(losses) == 10
    assert losses[0] > losses[-1], losses
    assert all(torch.isfinite(torch.tensor(losses)))

    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    targeted = set(config["target_modules"])
    base = _load_base(trained["model_dir"])
    sites = {s.name: s for s in linear_sites(base)}
    wanted = {name for name, s in sites.items() if s.role in _roles(trained["targets"])}
    assert wanted, "the preset selects nothing in this architecture"
    assert targeted == wanted
    # Every layer is adapted (layers: all).
    assert {sites[n].layer for n in targeted} == set(range(num_layers(base)))
    for name in targeted:
        parts = name.split(".")
        assert parts[-1] not in ("gate", "router"), name
        assert "experts" not in parts, name
        assert isinstance(base.get_submodule(name), torch.nn.Linear)

    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    saved = {k[len("base_model.model."):].rsplit(".lora_", 1)[0] for k in weights}
    assert saved == targeted
    assert any(float(w.abs().max()) > 0 for k, w in weights.items() if "lora_B" in k)


def test_moe_routers_and_experts_are_never_adapted(trained):
    """MoE routers and routed experts get no adapter, whatever the preset (dense models: nothing to do)."""
    base = _load_base(trained["model_dir"])
    config = json.loads((trained["run_dir"] / "adapter" / "adapter_config.json").read_text())
    layer_modules = {n for n, _ in base.named_modules() if ".layers." in n}
    routers = {n for n in layer_modules if n.endswith((".gate", ".router"))}
    experts = {n for n in layer_modules if n.endswith(".experts")}
    assert bool(routers and experts) == trained["moe"]  # the tiny MoE models really have both
    for name in config["target_modules"]:
        assert not any(name == r or name.startswith(r + ".") for r in routers | experts), name
    # Role classification never calls a router or routed expert an attention/mlp projection.
    for site in linear_sites(base):
        if any(site.name.startswith(e + ".") for e in experts):
            assert site.role == "expert", site
        if any(site.name == r or site.name.startswith(r + ".") for r in routers):
            assert site.role == "router", site
    # Even the widest preset leaves routers and routed experts alone.
    for site in select_sites(base, "all-linear", "all"):
        assert site.role in ("attention", "mlp")
        assert not any(site.name == r or site.name.startswith(r + ".") for r in routers | experts)


def test_peft_loads_the_adapter_with_deftunes_logits(trained, probe_ids):
    peft = pytest.importorskip("peft")
    base_logits = _logits(_load_base(trained["model_dir"]), probe_ids)

    ours, _, _ = api.load_for_inference(str(trained["run_dir"]), device="cpu")
    our_logits = _logits(ours, probe_ids)

    peft_model = peft.PeftModel.from_pretrained(_load_base(trained["model_dir"]),
                                                str(trained["run_dir"] / "adapter"))
    peft_model.eval()
    peft_logits = _logits(peft_model, probe_ids)

    torch.testing.assert_close(peft_logits, our_logits, atol=1e-5, rtol=0)
    assert (our_logits - base_logits).abs().max() > 1e-4


def test_deftune_loads_a_peft_made_adapter_with_peft_logits(trained, probe_ids, tmp_path):
    """The other direction: an adapter written by PEFT itself (short target names, non-zero B)."""
    peft = pytest.importorskip("peft")
    from deftune.adapters.peft_format import load_adapter

    config_path = trained["run_dir"] / "adapter" / "adapter_config.json"
    names = json.loads(config_path.read_text())["target_modules"]
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=leaves, init_lora_weights=False)
    peft_model = peft.get_peft_model(_load_base(trained["model_dir"]), config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    peft_logits = _logits(peft_model, probe_ids)

    ours = _load_base(trained["model_dir"])
    spec = load_adapter(ours, tmp_path / "peft")
    wrapped = {n for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(spec.module_names) == {n.removeprefix("base_model.model.") for n in wrapped}
    torch.testing.assert_close(_logits(ours, probe_ids), peft_logits, atol=1e-5, rtol=0)


def test_merge_gives_a_plain_model_with_the_adapters_logits(trained, probe_ids):
    out = trained["root"] / "merged"
    api.merge(str(trained["run_dir"]), str(out))
    merged = _load_base(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ours, _, _ = api.load_for_inference(str(trained["run_dir"]), device="cpu")
    base_logits = _logits(_load_base(trained["model_dir"]), probe_ids)
    merged_logits = _logits(merged, probe_ids)
    torch.testing.assert_close(merged_logits, _logits(ours, probe_ids), atol=1e-4, rtol=0)
    assert (merged_logits - base_logits).abs().max() > 1e-4


# -- layer selection and full tuning on one dense architecture ----------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _save_base(tmp_path_factory.mktemp("llama-extra") / "base", "llama")


def test_top_layer_selection_attaches_only_in_the_last_layer(llama_dir, data_file, tmp_path):
    tree = _recipe(llama_dir, data_file, tmp_path / "run", adapter={"layers": "top:1"},
                   train={"max_steps": 2})
    summary = api.train(recipe_from_dict(tree), progress=False)
    config = json.loads((Path(summary.run_dir) / "adapter" / "adapter_config.json").read_text())
    base = _load_base(llama_dir)
    last = num_layers(base) - 1
    sites = {s.name: s for s in linear_sites(base)}
    assert set(config["target_modules"]) == {n for n, s in sites.items() if s.layer == last}
    assert all(f".layers.{last}." in n for n in config["target_modules"])


def test_full_tuning_of_attention_leaves_everything_else_bitwise_unchanged(llama_dir, data_file, tmp_path):
    from safetensors.torch import load_file

    tree = _recipe(llama_dir, data_file, tmp_path / "run", method="full", adapter={"targets": "attention"},
                   train={"max_steps": 3, "lr": 1e-3})
    summary = api.train(recipe_from_dict(tree), progress=False)
    assert _losses(summary.run_dir)[0] > _losses(summary.run_dir)[-1]
    before = load_file(str(llama_dir / "model.safetensors"))
    after = load_file(str(Path(summary.run_dir) / "model" / "model.safetensors"))
    assert set(before) == set(after)
    base = _load_base(llama_dir)
    attention = {s.name for s in linear_sites(base) if s.role == "attention"}
    assert attention
    changed = set()
    for key, tensor in before.items():
        module = key.rsplit(".", 1)[0]
        if module in attention:
            if not torch.equal(tensor, after[key]):
                changed.add(module)
        else:
            assert after[key].dtype == tensor.dtype, key
            assert torch.equal(after[key], tensor), f"{key} changed but is not an attention weight"
    assert changed == attention
    assert summary.trainable_params == sum(before[f"{m}.weight"].numel() for m in attention)


# -- role classification by name, including layouts the tiny models above do not produce ---------------

ROLE_CASES = [
    ("model.layers.0.self_attn.q_proj", "attention"),
    ("model.layers.3.self_attn.kv_a_proj_with_mqa", "attention"),  # DeepSeek MLA
    ("model.layers.3.self_attn.q_b_proj", "attention"),
    ("model.layers.1.mlp.down_proj", "mlp"),
    ("model.layers.1.mlp.shared_experts.gate_proj", "mlp"),  # DeepSeek shared expert: dense MLP
    ("model.layers.1.mlp.shared_expert.up_proj", "mlp"),  # Qwen2-MoE shared expert
    ("model.layers.1.mlp.shared_expert_gate", "router"),  # Qwen2-MoE shared-expert gate
    ("model.layers.1.mlp.gate", "router"),  # Qwen-MoE / OLMoE / DeepSeek (linear layout)
    ("model.layers.1.block_sparse_moe.gate", "router"),  # Mixtral, transformers 4 layout
    ("model.layers.1.block_sparse_moe.experts.3.w1", "expert"),
    ("model.layers.1.mlp.experts.7.gate_proj", "expert"),  # DeepSeek-V2/V3, Qwen-MoE v4 layout
    ("model.layers.1.feed_forward.router", "router"),  # Llama 4
    ("model.layers.1.feed_forward.shared_expert.down_proj", "mlp"),
    ("model.layers.1.mlp.router.layer", "router"),  # router wrapping a linear (JetMoE, DBRX)
    ("model.layers.1.mlp.gate.wg", "router"),  # HunYuan-MoE
    ("model.language_model.layers.2.self_attn.o_proj", "attention"),  # Gemma 3 multimodal wrapper
    ("base_model.model.model.layers.0.mlp.up_proj", "mlp"),  # inside a PeftModel
]


@pytest.mark.parametrize("name,role", ROLE_CASES, ids=[c[0].split("layers.", 1)[1] for c in ROLE_CASES])
def test_classify_roles_by_name(name, role):
    layer = int(name.split("layers.", 1)[1].split(".")[0])
    assert classify(name) == (layer, role)


@pytest.mark.parametrize("name", ["model.embed_tokens", "lm_head", "model.layers.0.input_layernorm"])
def test_classify_outside_the_decoder_projections_is_none(name):
    assert classify(name) is None


def test_router_wrapping_a_linear_is_never_an_mlp_target():
    """HunYuan-MoE keeps its router as ``mlp.gate.wg`` (an nn.Linear): presets must not adapt it."""
    config_cls = getattr(transformers, "HunYuanMoEV1Config", None)
    if config_cls is None:
        pytest.skip("this transformers has no HunYuan-MoE")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=4, moe_topk=2, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    ))
    routers = [s for s in linear_sites(model) if s.leaf == "wg"]
    assert routers and all(s.role == "router" for s in routers)
    picked = {s.name for s in select_sites(model, "all-linear", "all")}
    assert picked and not any(".gate." in n for n in picked)


def test_layer_selection_on_a_moe_model():
    """top/bottom select whole decoder layers; DeepSeek-V3's dense first layer is the bottom one."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config("deepseek_v3", 400))
    bottom = select_sites(model, "mlp", "bottom:1")
    assert bottom and {s.layer for s in bottom} == {0}
    assert {s.leaf for s in bottom} == {"gate_proj", "up_proj", "down_proj"}
    top = select_sites(model, "mlp", "top:1")  # the MoE layer: only its shared expert is an MLP
    assert top and all(".shared_experts." in s.name for s in top)
    assert {s.layer for s in select_sites(model, "attention", "top:1")} == {1}
