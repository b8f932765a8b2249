"""Expert-level tuning of MoE models (ESFT, expert-LoRA) on tiny random models of every MoE family.

Checks: the wrapped experts equal the originals at step 0; training changes the selected experts only
(unselected ones, routers and everything else bitwise unchanged); nothing trainable spans all experts
and the optimizer state has exactly the selected slices' elements; expert-LoRA runs only on the rows
routed to the selected experts; the ESFT patch holds only the changed slices; both results merge into a
plain transformers folder with equal logits, different from the base; bad selections fail clearly.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import transformers
from conftest import make_tiny_tokenizer
from moe_configs import FAMILIES, moe_config
from safetensors import safe_open

from deftune import api
from deftune.adapters import experts as X
from deftune.adapters.experts import layer as expert_layer
from deftune.config import recipe_from_dict
from deftune.errors import DeftuneError
from deftune.models.moe import moe_blocks

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(arch: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(moe_config(arch, **kw)).eval()


def _save(folder: Path, arch: str) -> Path:
    tok = make_tiny_tokenizer()
    model = _model(arch, vocab=len(tok))
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def _data(path: Path, n: int = 32) -> Path:
    rng = random.Random(0)
    rows = [{"query": f"copy: {' '.join(rng.sample(WORDS, 3))}"} for _ in range(n)]
    for r in rows:
        r["response"] = r["query"][6:]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _recipe(model_dir, data, out, method, select="d", domains=None, **over):
    tree = {
        "method": method,
        "device": "cpu",
        "output_dir": str(out),
        "model": {"path": str(model_dir)},
        "data": {"train": str(data), "eval_fraction": 0.2, "max_length": 48},
        "adapter": {"rank": 4, "alpha": 8.0},
        "experts": {"domains": domains or {"d": [1, 6]}, "select": select},
        "train": {
            "max_steps": 4,
            "lr": 5e-2,
            "micro_batch": 4,
            "grad_accum": 1,
            "warmup": 0,
            "schedule": "constant",
            "log_every": 1,
            "save_every": 2,
        },
        "eval": {"samples": 0, "show_examples": 0},
        "monitor": {"tensorboard": False, "report": False},
    }
    for section, values in over.items():
        tree.setdefault(section, {}).update(values) if isinstance(values, dict) else tree.update(
            {section: values}
        )
    return recipe_from_dict(tree)


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("mode", ["esft", "lora"])
def test_wrapped_experts_equal_the_originals_at_step_zero(arch, mode):
    model = _model(arch)
    ids = torch.randint(3, 400, (2, 13))
    with torch.no_grad():
        ref = model(ids).logits
        X.attach_experts(model, {b.layer: [1, 4, 7] for b in moe_blocks(model)}, mode, rank=4, alpha=8)
        out = model(ids).logits
    # Same sums in another order (rows sorted by expert): equal to float rounding.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_grouped_linear_loop_matches_per_group_matmuls():
    x = torch.randn(10, 6)
    w = torch.randn(3, 5, 6)
    offs = torch.tensor([3, 3, 10], dtype=torch.int32)  # group 1 gets no rows
    ref = torch.cat([x[:3] @ w[0].T, x[3:] @ w[2].T])
    torch.testing.assert_close(X.grouped_linear(x, w, offs), ref)


def test_expert_lora_runs_only_on_rows_routed_to_selected_experts(monkeypatch):
    model = _model("qwen3_moe")
    block = moe_blocks(model)[1]
    selected = [2, 5]
    X.attach_experts(model, {block.layer: selected}, "lora", rank=4, alpha=8)
    routed = {}

    def keep(_module, _inputs, output):
        routed["index"] = output[2]

    block.router.register_forward_hook(keep)
    lora_rows = []
    real = expert_layer.grouped_linear

    def spy(x, weight, offsets, bounds=None):
        if weight.requires_grad:  # the LoRA factors (cast copies keep requires_grad)
            lora_rows.append(x.shape[0])
        return real(x, weight, offsets, bounds)

    monkeypatch.setattr(expert_layer, "grouped_linear", spy)
    model(torch.randint(3, 400, (3, 17)))
    expected = int(torch.isin(routed["index"], torch.tensor(selected)).sum())
    # A then B, for gate_up and for down: four LoRA GEMMs, each over exactly the selected rows.
    assert lora_rows == [expected] * 4
    assert 0 < expected < routed["index"].numel()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return _data(tmp_path_factory.mktemp("data") / "d.jsonl")


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("dsv3"), "deepseek_v3")


def _param_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["esft", "expert-lora"])
def test_training_changes_only_the_selected_experts(method, ds_dir, data_file, tmp_path):
    recipe = _recipe(ds_dir, data_file, tmp_path / "run", method, domains={"d": {1: [1, 6], 2: [3]}})
    summary = api.train(recipe, progress=False)
    base = transformers.AutoModelForCausalLM.from_pretrained(ds_dir, dtype=torch.float32)
    before = _param_snapshot(base)
    merged_dir = api.merge(summary.run_dir, str(tmp_path / "merged"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    after = _param_snapshot(merged)
    assert before.keys() == after.keys()
    selected = {1: [1, 6], 2: [3]}
    for name, tensor in after.items():
        changed_rows = None
        for layer, ids in selected.items():
            if name.startswith(f"model.layers.{layer}.mlp.experts."):
                changed_rows = ids
        if changed_rows is None:
            assert torch.equal(tensor, before[name]), f"{name} changed"
            continue
        others = [e for e in range(tensor.shape[0]) if e not in changed_rows]
        assert torch.equal(tensor[others], before[name][others]), f"unselected experts of {name} changed"
        for e in changed_rows:
            assert not torch.equal(tensor[e], before[name][e]), f"{name}[{e}] did not change"
    # Trainable share is reported and equals the selected slices (esft) / their LoRA factors.
    n_sel = 3
    if method == "esft":
        assert summary.trainable_params == n_sel * (2 * 16 * 32 + 32 * 16)
    else:
        assert summary.trainable_params == n_sel * (4 * 32 + 2 * 16 * 4 + 4 * 16 + 32 * 4)


@pytest.mark.parametrize("method", ["esft", "expert-lora"])
def test_merged_folder_loads_with_the_runs_logits(method, ds_dir, data_file, tmp_path):
    summary = api.train(_recipe(ds_dir, data_file, tmp_path / "run", method), progress=False)
    ids, merged_logits = _assert_merge_keeps_the_runs_logits(summary.run_dir, tmp_path / "merged")
    base = transformers.AutoModelForCausalLM.from_pretrained(ds_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (merged_logits - base(ids).logits).abs().max() > 1e-4


def _assert_merge_keeps_the_runs_logits(run_dir, out):
    """``deftune merge`` of the run gives a plain folder with the run's logits; returns (ids, logits)."""
    tuned, _, _ = api.load_for_inference(run_dir, "cpu")
    merged_dir = api.merge(run_dir, str(out))
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    ids = torch.randint(3, 300, (2, 15))
    with torch.no_grad():
        merged_logits = merged.eval()(ids).logits
        torch.testing.assert_close(merged_logits, tuned(ids).logits, rtol=1e-4, atol=1e-5)
    return ids, merged_logits


def test_esft_patch_holds_only_the_selected_slices(ds_dir, data_file, tmp_path):
    summary = api.train(
        _recipe(ds_dir, data_file, tmp_path / "run", "esft", domains={"d": {1: [0, 5], 2: [7]}}),
        progress=False,
    )
    folder = Path(summary.output)
    meta = json.loads((folder / "esft_patch.json").read_text())
    assert meta["selection"] == {"1": [0, 5], "2": [7]}
    with safe_open(str(folder / "esft_patch.safetensors"), "pt") as fh:
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    assert shapes == {
        "model.layers.1.mlp.experts.gate_up_proj": (2, 32, 32),
        "model.layers.1.mlp.experts.down_proj": (2, 32, 16),
        "model.layers.2.mlp.experts.gate_up_proj": (1, 32, 32),
        "model.layers.2.mlp.experts.down_proj": (1, 32, 16),
    }


def test_optimizer_state_covers_only_the_selected_slices(ds_dir):
    from deftune.training.optim import param_groups

    recipe = _recipe(ds_dir, "demo", "unused", "esft", domains={"d": [2, 3]})
    model, _, _ = __import__("deftune.models.load", fromlist=["load_model"]).load_model(
        recipe.model, torch.device("cpu")
    )
    X.prepare(recipe, model, torch.device("cpu"))
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-3)
    model(torch.randint(3, 300, (2, 9)), labels=torch.randint(3, 300, (2, 9))).loss.backward()
    opt.step()
    state = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in opt.state.values())
    per_layer = 2 * (2 * 16 * 32 + 32 * 16)  # two experts of [2I, H] + [H, I]
    assert state == 2 * (2 * per_layer)  # two MoE layers, two moments
    # No trainable tensor has the expert dimension E = 8.
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.shape[0] == 2, name


def test_router_is_trained_only_when_asked(ds_dir, data_file, tmp_path):
    summary = api.train(
        _recipe(
            ds_dir,
            data_file,
            tmp_path / "run",
            "esft",
            experts={"domains": {"d": [1]}, "select": "d", "train_router": True},
        ),
        progress=False,
    )
    meta = json.loads((Path(summary.output) / "esft_patch.json").read_text())
    assert sorted(meta["full"]) == ["model.layers.1.mlp.gate.weight", "model.layers.2.mlp.gate.weight"]


def test_expert_lora_with_attention_and_shared_experts(ds_dir, data_file, tmp_path):
    summary = api.train(
        _recipe(
            ds_dir,
            data_file,
            tmp_path / "run",
            "expert-lora",
            experts={"domains": {"d": [1]}, "select": "d", "also": "attention+shared"},
        ),
        progress=False,
    )
    folder = Path(summary.output)
    config = json.loads((folder / "adapter_config.json").read_text())
    targets = set(config["target_modules"]) if isinstance(config["target_modules"], list) else set()
    assert any("shared_experts" in t for t in targets) and any("self_attn" in t for t in targets)
    _assert_merge_keeps_the_runs_logits(summary.run_dir, tmp_path / "m")


def test_resume_restores_expert_training_exactly(ds_dir, data_file, tmp_path, monkeypatch):
    from conftest import wire_trainer

    full = api.train(_recipe(ds_dir, data_file, tmp_path / "a", "expert-lora"), progress=False)
    wired = wire_trainer(monkeypatch)
    wired.stop_at = 2  # SIGTERM after step 2: the trainer saves a checkpoint and stops
    from deftune.training.loop import TrainingInterrupted

    with pytest.raises(TrainingInterrupted):
        api.train(_recipe(ds_dir, data_file, tmp_path / "b", "expert-lora"), progress=False)
    wired.stop_at = None
    resumed = api.train(
        _recipe(ds_dir, data_file, tmp_path / "b", "expert-lora", train={"resume": "auto"}), progress=False
    )

    def losses(run):
        rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    a, b = losses(full.run_dir), losses(resumed.run_dir)
    assert resumed.steps == 4
    for step in (3, 4):
        assert a[step] == pytest.approx(b[step], rel=1e-5)


@pytest.mark.parametrize(
    "domains,select,message",
    [
        ({"d": [1]}, "cardio", "neither a domain"),
        ({"d": [9]}, "d", "out of range"),
        ({"d": {0: [1]}}, "d", "layer 0 has no routed experts"),
        ({"d": [1]}, "", "needs experts.select"),
        ({"d": [1]}, "missing.json", "not found"),
    ],
)
def test_bad_selections_fail_naming_the_key(ds_dir, domains, select, message):
    model = _model("deepseek_v3")
    # Names are checked when the recipe is read, ids and layers once the model is known.
    with pytest.raises(DeftuneError, match=message):
        recipe = _recipe(ds_dir, "demo", "unused", "esft", select=select, domains=domains)
        X.prepare(recipe, model, torch.device("cpu"))


def test_expert_methods_refuse_a_dense_model(tiny_llama_dir):
    recipe = _recipe(tiny_llama_dir, "demo", "unused", "expert-lora")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with pytest.raises(DeftuneError, match="needs a Mixture-of-Experts model"):
        X.prepare(recipe, model, torch.device("cpu"))


def test_recipe_keys_are_checked():
    with pytest.raises(DeftuneError, match="experts.also"):
        recipe_from_dict(
            {"method": "esft", "experts": {"also": "attn", "domains": {"d": [1]}, "select": "d"}}
        )
    with pytest.raises(DeftuneError, match="train_router"):
        recipe_from_dict({"method": "expert-lora", "experts": {"train_router": True, "select": "x.json"}})
    with pytest.raises(DeftuneError, match="method must be one of"):
        recipe_from_dict({"method": "esfft"})
    r = recipe_from_dict(
        {"method": "esft", "experts": {"domains": "{cardiology: [0, 1, 5]}", "select": "cardiology"}}
    )
    assert r.experts.domains == {"cardiology": [0, 1, 5]}


def test_fast_path_on_a_moe_model_fuses_norms_lora_and_head_and_keeps_the_loss(ds_dir):
    from deftune.models.load import load_model
    from deftune.training.loss import response_loss_sum

    ids = torch.randint(3, 300, (2, 11))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    losses, logs = [], []
    for fast in (False, True):
        recipe = _recipe(
            ds_dir,
            "demo",
            "unused",
            "expert-lora",
            model={"path": str(ds_dir), "fast": fast},
            experts={"domains": {"d": [1, 2]}, "select": "d", "also": "attention"},
        )
        model, _, _ = load_model(recipe.model, torch.device("cpu"))
        torch.manual_seed(0)
        X.prepare(recipe, model, torch.device("cpu"))
        if fast:
            from deftune.fast_path.patch import apply_fast_path

            counts = apply_fast_path(model, log=logs.append)
        loss, _ = response_loss_sum(model, batch)
        loss.backward()
        losses.append((loss.item(), model.model.layers[1].mlp.experts.lora_gate_up_A.grad.clone()))
    # 3 layers: 2 norms each + final norm + MLA's q_a / kv_a norms (2 per layer); MLA has 5 projections
    # (q_a, q_b, kv_a_with_mqa, kv_b, o).
    assert counts == {
        "rms_norm": 3 * 2 + 1 + 3 * 2,
        "rope": 0,
        "swiglu": 0,
        "lora_linear": 3 * 5,
        "linear_cross_entropy": 1,
    }
    assert "MoE" in logs[0] and "attention and RoPE stay" in logs[0]
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-5)
    torch.testing.assert_close(losses[1][1], losses[0][1], rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["esft", "lora"])
def test_grouped_gemm_path_matches_the_loop_on_cuda(mode, monkeypatch):
    """On CUDA in bf16 the experts run as grouped GEMMs; outputs and trainable gradients equal the
    per-expert loop's (bf16 tolerance)."""
    torch.manual_seed(0)
    config = moe_config("qwen3_moe", experts=16, top_k=4)
    config.hidden_size, config.moe_intermediate_size = 64, 32
    model = transformers.AutoModelForCausalLM.from_config(config).to("cuda", torch.bfloat16)
    block = moe_blocks(model)[0]
    X.attach_experts(model, {block.layer: [1, 5, 9]}, mode, rank=8, alpha=16)
    experts = model.get_submodule(f"{block.name}.experts")
    if mode == "lora":
        for b in (experts.lora_gate_up_B, experts.lora_down_B):
            torch.nn.init.normal_(b, std=0.05)
    h = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():  # one routing for both runs (each run backwards through its own graph only)
        _logits, weights, index = block.router(h)

    def run():
        experts.zero_grad(set_to_none=True)
        out = experts(h, index, weights)
        out.float().pow(2).sum().backward()
        return out.detach().float(), {
            n: p.grad.float() for n, p in experts.named_parameters() if p.requires_grad
        }

    assert expert_layer._grouped_mm_available(h, experts.gate_up_proj)
    grouped, g_grads = run()
    monkeypatch.setattr(expert_layer, "_grouped_mm_available", lambda x, w: False)
    loop, l_grads = run()
    torch.testing.assert_close(grouped, loop, rtol=2e-2, atol=2e-2)
    for name in g_grads:
        scale = float(l_grads[name].abs().max())
        torch.testing.assert_close(g_grads[name], l_grads[name], rtol=5e-2, atol=5e-2 * scale, msg=name)


def test_a_domain_can_name_a_selection_file(tmp_path):
    from deftune.adapters.experts.select import resolve_selection

    model = _model("deepseek_v3")
    blocks = moe_blocks(model)
    path = tmp_path / "cardio.json"
    path.write_text(json.dumps({"selection": {"1": [0, 5], "2": [7]}}))
    assert resolve_selection({"cardiology": str(path)}, "cardiology", blocks) == {1: [0, 5], 2: [7]}
    with pytest.raises(DeftuneError, match="experts.domains.onc: selection file"):
        resolve_selection({"onc": str(tmp_path / "missing.json")}, "onc", blocks)


def test_expert_lora_over_a_4bit_base_trains_and_merges(ds_dir, data_file, tmp_path):
    """QLoRA-style: attention in NF4 with LoRA, experts in their dtype with expert-LoRA; the merge is a
    plain folder with the run's logits (dequantized attention + s B A, experts + s B_e A_e)."""
    recipe = _recipe(
        ds_dir,
        data_file,
        tmp_path / "run",
        "expert-lora",
        model={"path": str(ds_dir), "quantize": "nf4"},
        experts={"domains": {"d": [1, 2]}, "select": "d", "also": "attention"},
    )
    summary = api.train(recipe, progress=False)
    _assert_merge_keeps_the_runs_logits(summary.run_dir, tmp_path / "m")
