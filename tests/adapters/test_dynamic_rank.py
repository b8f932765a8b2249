import json
import math
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_recipe
from torch import nn

from deftune.adapters.dynamic_rank import allocate_ranks, format_ranks, make_budget
from deftune.adapters.lora.layer import LoRALinear, best_rank_factors
from deftune.adapters.lora.model import attach_lora, lora_modules
from deftune.training import loop
from deftune.training.callbacks.dynamic_rank import DynamicRankCallback, from_recipe


def _build(recipe):
    """What api.train does up to the Trainer, with the dynamic-rank callback attached."""
    from deftune.data import prepare_data
    from deftune.data.tokenize import ensure_pad_token
    from deftune.models.load import load_model
    from deftune.recipes.sft import prepare_model
    from deftune.training.loop import seed_everything

    device = torch.device("cpu")
    seed_everything(recipe.train.seed)
    model, tokenizer, _ = load_model(recipe.model, device)
    ensure_pad_token(tokenizer)
    data = prepare_data(recipe.data, tokenizer)
    seed_everything(recipe.train.seed)
    spec = prepare_model(recipe, model, device)
    callback = from_recipe(recipe, model)
    trainer = loop.Trainer(recipe, model, tokenizer, data, Path(recipe.output_dir), device, progress=False,
                           callbacks=[callback])
    return trainer, callback, spec


def _recipe(model_dir, data_file, out, ranks, sensitivity=0.5, steps=8, **extra):
    adapter = {"rank": max(ranks), "alpha": 8, "ranks": ranks, "sensitivity": sensitivity,
               "rank_window": [0.0, 0.5], **extra.pop("adapter", {})}
    train = {"max_steps": steps, "grad_accum": 1, **extra.pop("train", {})}
    return tiny_recipe(model_dir, data_file, out, adapter=adapter, train=train, **extra)


def _events(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in _events(run_dir) if "loss" in r}


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- 1. the resize keeps the best rank-k part of the update -------------------------------------------
def test_best_rank_factors_is_truncated_svd_and_exact_at_full_rank():
    torch.manual_seed(0)
    b, a = torch.randn(20, 6), torch.randn(6, 30)
    u, s, vh = torch.linalg.svd(b @ a)
    for k in (1, 3):
        b2, a2 = best_rank_factors(b, a, k)
        assert b2.shape == (20, k) and a2.shape == (k, 30)
        torch.testing.assert_close(b2 @ a2, (u[:, :k] * s[:k]) @ vh[:k], atol=1e-4, rtol=1e-4)
    b6, a6 = best_rank_factors(b, a, 6)
    torch.testing.assert_close(b6 @ a6, b @ a, atol=1e-5, rtol=1e-5)


def test_resize_keeps_scaling_and_full_rank_resize_leaves_logits_unchanged():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    attach_lora(model, "all-linear", "all", rank=4, alpha=8.0)
    for m in lora_modules(model).values():
        nn.init.normal_(m.lora_B.weight, std=0.1)
    ids = torch.randint(0, 64, (2, 9))
    before = _logits(model, ids)
    for m in lora_modules(model).values():  # k = r through the SVD path: exact
        b, a = best_rank_factors(m.lora_B.weight, m.lora_A.weight, 4)
        m.lora_A.weight.data.copy_(a)
        m.lora_B.weight.data.copy_(b)
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=0)
    for m in lora_modules(model).values():  # growing: new components have B = 0
        m.resize(6)
        assert m.lora_A.weight.shape == (6, m.in_features) and m.scaling == pytest.approx(m.alpha / 6)
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=0)
    layer = next(iter(lora_modules(model).values()))
    full = layer.delta_weight()
    layer.resize(2)
    u, s, vh = torch.linalg.svd(full)
    torch.testing.assert_close(layer.delta_weight(), (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5, rtol=1e-4)
    assert layer.alpha == pytest.approx(2.0 * 2) and layer.scaling == pytest.approx(layer.alpha / 2)


# -- 2. the modules that matter get the rank ---------------------------------------------------------
class _Parallel(nn.Module):
    """Four adapted linears, each on its own slice of the input, so each has its own gradient signal."""

    def __init__(self, n=4, d=16, rank=8):
        super().__init__()
        self.blocks = nn.ModuleList(LoRALinear(nn.Linear(d, d), rank, 16.0) for _ in range(n))
        for p in self.parameters():
            p.requires_grad_(False)
        for blk in self.blocks:
            blk.lora_A.weight.requires_grad_(True)
            blk.lora_B.weight.requires_grad_(True)

    def forward(self, x):
        return torch.stack([blk(x[:, i]) for i, blk in enumerate(self.blocks)], 1)


def test_scores_give_the_rank_to_the_modules_the_task_needs():
    torch.manual_seed(0)
    n, d = 4, 16
    model = _Parallel(n, d)
    # The task only needs modules 0 and 1 to change (a rank-8 update each); 2 and 3 barely.
    deltas = [torch.randn(d, 8) @ torch.randn(8, d) * 0.3 for _ in range(2)] + [torch.randn(d, d) * 1e-3] * 2
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    logged = []
    trainer = SimpleNamespace(step=0, total_steps=40, model=model, device=torch.device("cpu"),
                              log=logged.append, say=lambda text: None, rebuild_optimizer=lambda: None)
    callback = DynamicRankCallback([0, 2, 4, 8], sensitivity=0.5, window=(0.0, 1.0))
    callback.on_train_start(trainer)
    for step in range(40):
        trainer.step = step
        x = torch.randn(32, n, d)
        with torch.no_grad():
            target = torch.stack([model.blocks[i].base_layer(x[:, i]) + x[:, i] @ deltas[i].T
                                  for i in range(n)], 1)
        loss = ((model(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        callback.after_backward(trainer)
        opt.step()
    trainer.step = 40
    ranks = callback.allocate(trainer)
    # Budget 32 - 0.5 * 32 = 16 rank units.
    assert ranks == {"blocks.0": 8, "blocks.1": 8, "blocks.2": 0, "blocks.3": 0}
    assert isinstance(model.blocks[2], nn.Linear) and model.blocks[0].rank == 8
    assert logged[-1]["event"] == "rank_allocation" and logged[-1]["budget"] == 16
    assert "blocks.0: 8" in format_ranks(ranks)


def test_parameter_budget_and_growth_in_the_allocator():
    # Param budget: q (cost 64/unit) and mlp (cost 96/unit) have equal scores; score per parameter wins.
    scores = {"q": torch.tensor([4.0, 3.0, 2.0, 1.0]), "mlp": torch.tensor([4.0, 3.0, 2.0, 1.0])}
    costs = {"q": 64, "mlp": 96}
    ranks = allocate_ranks(scores, {"q": 4, "mlp": 4}, costs, [1, 2, 4], budget=4 * 64 + 2 * 96)
    assert ranks == {"q": 4, "mlp": 2}
    assert sum(r * costs[n] for n, r in ranks.items()) <= 4 * 64 + 2 * 96
    # Rounding: 3 kept components -> candidate 4 only when the budget allows, else 2.
    tight = allocate_ranks({"a": torch.tensor([5.0, 4, 3, 0]), "b": torch.tensor([9.0, 0, 0, 0])},
                           {"a": 4, "b": 4}, {"a": 1, "b": 1}, [1, 2, 4], budget=4)
    assert tight == {"a": 2, "b": 1}
    # Re-allocation: a rank-1 module whose only component beats everything grows back.
    grown = allocate_ranks({"a": torch.tensor([10.0]), "b": torch.tensor([1.0, 0.5, 0.2, 0.1])},
                           {"a": 1, "b": 4}, {"a": 1, "b": 1}, [1, 2, 4], budget=5)
    assert grown == {"a": 4, "b": 1}
    budget = make_budget({"q": (32, 32), "k": (32, 16)}, [0, 2, 8], sensitivity=0.25, param_budget=0)
    assert (budget.amount, budget.unit) == (12, "rank")


# -- 3. adapters shrink, the optimizer follows, training goes on -----------------------------------
def test_allocation_shrinks_adapters_and_optimizer_and_training_continues(tiny_llama_dir, copy_task_file,
                                                                          tmp_path):
    recipe = _recipe(tiny_llama_dir, copy_task_file, tmp_path / "run", ranks=[1, 2, 4], sensitivity=0.7)
    trainer, callback, _ = _build(recipe)
    start_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.run()
    events = [e for e in _events(tmp_path / "run") if e.get("event") == "rank_allocation"]
    assert len(events) == 1 and events[0]["step"] == 4
    modules = lora_modules(trainer.model)
    assert {n: m.rank for n, m in modules.items()} == events[0]["ranks"] == callback.final_ranks()
    for m in modules.values():
        assert m.lora_A.weight.shape[0] == m.rank == m.lora_B.weight.shape[1]
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    count = sum(p.numel() for p in trainable)
    assert count == events[0]["adapter_params"] < start_params
    assert sum(m.rank for m in modules.values()) <= events[0]["budget"]  # 56 - 0.7 * 42 -> 27 rank units
    opt_params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in opt_params} == {id(p) for p in trainable}
    assert sum(s["exp_avg"].numel() for s in trainer.optimizer.state.values()) == count
    losses = _losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 9)) and all(math.isfinite(v) for v in losses.values())


def test_reallocation_keeps_training(tiny_llama_dir, copy_task_file, tmp_path):
    recipe = _recipe(tiny_llama_dir, copy_task_file, tmp_path / "run", ranks=[1, 2, 4],
                     adapter={"rank_window": [0.0, 0.25], "rank_reallocate_every": 2})
    trainer, _, _ = _build(recipe)
    trainer.run()
    steps = [e["step"] for e in _events(tmp_path / "run") if e.get("event") == "rank_allocation"]
    assert steps == [2, 4, 6]
    assert all(math.isfinite(v) for v in _losses(tmp_path / "run").values())


# -- 4. PEFT loads the resized adapter --------------------------------------------------------------
def test_peft_loads_dynamic_rank_adapter_with_equal_logits(tiny_llama_dir, copy_task_file, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from deftune.adapters.peft_format import load_adapter, read_adapter_config, save_adapter

    recipe = _recipe(tiny_llama_dir, copy_task_file, tmp_path / "run", ranks=[0, 2, 4], sensitivity=0.8)
    trainer, callback, spec = _build(recipe)
    trainer.run()
    ranks = callback.final_ranks()
    assert 0 in ranks.values() and {2, 4} & set(ranks.values())
    folder = save_adapter(trainer.model, spec, tmp_path / "adapter", str(tiny_llama_dir))
    config = read_adapter_config(folder)
    assert sorted(config["target_modules"]) == sorted(n for n, r in ranks.items() if r > 0)
    resized = {n for n, r in ranks.items() if 0 < r < 4}
    assert len(config["rank_pattern"]) == len(config["alpha_pattern"]) == len(resized) > 0

    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = _logits(trainer.model, ids)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    base_logits = _logits(base, ids)
    peft_model = peft.PeftModel.from_pretrained(base, str(folder))
    torch.testing.assert_close(_logits(peft_model, ids), ours, atol=1e-5, rtol=0)
    reloaded = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    load_adapter(reloaded, folder)  # deftune's own loader reads the patterns too
    torch.testing.assert_close(_logits(reloaded, ids), ours, atol=1e-5, rtol=0)
    assert (ours - base_logits).abs().max() > 1e-4


# -- 5. resume after the allocation -----------------------------------------------------------------
def test_resume_after_allocation_matches_uninterrupted_run(tiny_llama_dir, copy_task_file, tmp_path,
                                                           monkeypatch):
    def recipe(out, resume=""):
        return _recipe(tiny_llama_dir, copy_task_file, out, ranks=[0, 1, 2, 4], sensitivity=0.6,
                       adapter={"dropout": 0.1}, train={"save_every": 100, "resume": resume})

    trainer, full_cb, _ = _build(recipe(tmp_path / "full"))
    trainer.run()
    reference = _losses(tmp_path / "full")

    original = loop.Trainer.train_step

    def interrupt_after_five(self):
        out = original(self)
        if self.step == 5:
            self._stop_signal = signal.SIGTERM
        return out

    monkeypatch.setattr(loop.Trainer, "train_step", interrupt_after_five)
    trainer, _, _ = _build(recipe(tmp_path / "cut"))
    with pytest.raises(loop.TrainingInterrupted, match="at step 5"):
        trainer.run()
    monkeypatch.setattr(loop.Trainer, "train_step", original)

    trainer, resumed_cb, _ = _build(recipe(tmp_path / "cut", resume="auto"))
    result = trainer.run()
    assert result.steps == 8 and result.resumed_from.endswith("step-0000005")
    assert resumed_cb.final_ranks() == full_cb.final_ranks()
    assert {n: m.rank for n, m in lora_modules(trainer.model).items()} == {
        n: r for n, r in full_cb.final_ranks().items() if r}
    resumed = _losses(tmp_path / "cut")
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), step
