"""Progressive unfreezing: stage 0 trains only its modules, later stages join with their own warm-up."""

import json

import pytest
import torch
from conftest import tiny_recipe, wire_trainer

from deftune.api import train
from deftune.errors import DeftuneError
from deftune.training import loop
from deftune.training.callbacks.stages import stage_targets_union

STAGES = [{"targets": "attention", "steps": 3}, {"targets": "attention+mlp"}]


class Probe(loop.Callback):
    """Per step: the learning rate each start_step group used, and snapshots of every parameter."""

    name = "probe"

    def __init__(self):
        self.lrs, self.snapshots = {}, {}

    def on_train_start(self, trainer):
        self.snapshots[trainer.step] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    def after_optimizer_step(self, trainer):
        self.lrs[trainer.step + 1] = {g["start_step"]: g["lr"] for g in trainer.optimizer.param_groups}

    def on_step_end(self, trainer):
        self.snapshots[trainer.step] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def wire(monkeypatch, *extra):
    return wire_trainer(monkeypatch, *extra)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in _rows(run_dir) if "loss" in r}


def _sections(**train_cfg):
    return dict(adapter={"stages": STAGES, "stage_warmup": 2},
                train={"max_steps": 6, "weight_decay": 0.1, "schedule": "constant", "warmup": 1, **train_cfg})


@pytest.mark.parametrize("method", ["lora", "full"])
def test_stage_zero_trains_attention_then_both(tiny_llama_dir, copy_task_file, tmp_path, monkeypatch, method):
    probe = Probe()
    wire(monkeypatch, probe)
    run = tmp_path / "run"
    train(tiny_recipe(tiny_llama_dir, copy_task_file, run, method=method, **_sections()), progress=False)
    snaps = probe.snapshots
    in_blocks = (lambda n: ".lora_" in n) if method == "lora" else (lambda n: ".mlp." in n or ".self_attn." in n)
    trainable = [n for n in snaps[0] if in_blocks(n)]
    attention = [n for n in trainable if ".self_attn." in n]
    mlp = [n for n in trainable if ".mlp." in n]
    assert attention and mlp and len(attention) + len(mlp) == len(trainable)
    for n in mlp:  # bitwise unchanged (weight decay 0.1) up to the boundary, then trained
        assert torch.equal(snaps[0][n], snaps[3][n]), n
    assert all(not torch.equal(snaps[0][n], snaps[3][n]) for n in attention if ".lora_A." not in n)
    assert all(not torch.equal(snaps[3][n], snaps[6][n]) for n in trainable)
    base = [n for n in snaps[0] if n not in trainable]
    assert all(torch.equal(snaps[0][n], snaps[6][n]) for n in base)

    events = [r for r in _rows(run) if r.get("event") == "stage"]
    assert len(events) == 1 and events[0]["step"] == 3 and events[0]["stage"] == 1
    assert events[0]["targets"] == "attention+mlp"
    assert events[0]["new_params"] == sum(snaps[0][n].numel() for n in mlp)


def test_new_adapters_warm_up_from_the_stage_boundary(tiny_llama_dir, copy_task_file, tmp_path, monkeypatch):
    probe = Probe()
    wire(monkeypatch, probe)
    train(tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "run", **_sections()), progress=False)
    lr = 5e-3  # tiny_recipe's peak lr; schedule constant after a 1-step warm-up
    for step in (1, 2, 3):
        assert probe.lrs[step] == {0: pytest.approx(lr)}
    # Stage 1 starts after step 3: its adapters train from step 4 at lr/2, then lr (stage_warmup 2).
    assert probe.lrs[4] == {0: pytest.approx(lr), 3: pytest.approx(lr / 2)}
    assert probe.lrs[5] == {0: pytest.approx(lr), 3: pytest.approx(lr)}
    assert probe.lrs[6] == {0: pytest.approx(lr), 3: pytest.approx(lr)}


# Cut at 3 = resume exactly on the boundary, while the new adapters are mid-warm-up: each param group must
# get back its own LR lambda (the warming group must not jump to the full LR).
@pytest.mark.parametrize("cut", [2, 3])
def test_resume_across_a_stage_boundary_matches(tiny_llama_dir, copy_task_file, tmp_path, monkeypatch, cut):
    sections = _sections(save_every=100)
    sections["adapter"]["dropout"] = 0.1
    wire(monkeypatch)
    train(tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "full", **sections), progress=False)
    reference = _losses(tmp_path / "full")

    trainer_cls = wire(monkeypatch)
    trainer_cls.stop_at = cut
    with pytest.raises(loop.TrainingInterrupted):
        train(tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "cut", **sections), progress=False)
    trainer_cls.stop_at = None
    sections["train"]["resume"] = "auto"
    train(tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "cut", **sections), progress=False)
    resumed = _losses(tmp_path / "cut")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), step
    assert [r["step"] for r in _rows(tmp_path / "cut") if r.get("event") == "stage"] == [3]


def test_stages_with_a_mask_never_unfreeze_masked_tensors(tiny_llama_dir, copy_task_file, tmp_path, monkeypatch):
    probe = Probe()
    wire(monkeypatch, probe)
    train(tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "run", mask={"modules": ["*.up_proj.*",
                                                                                         "*.q_proj.*"]},
                      **_sections()), progress=False)
    snaps = probe.snapshots
    moved = {n for n in snaps[0] if not torch.equal(snaps[0][n], snaps[6][n])}
    assert moved and all(".up_proj." in n or ".q_proj." in n for n in moved)
    assert any(".up_proj." in n for n in moved)


def test_stage_targets_union():
    assert stage_targets_union(STAGES, "all") == (["attention", "mlp"], "all")
    stages = [{"targets": ["q_proj", "v_proj"], "steps": 5}, {"targets": "mlp+v_proj"}]
    assert stage_targets_union(stages, "top:2") == (["q_proj", "v_proj", "mlp"], "top:2")
    with pytest.raises(DeftuneError, match="needs the model"):
        stage_targets_union([{"targets": "attention", "steps": 1, "layers": "top:1"}, {"targets": "mlp"}], "all")


def test_stage_targets_union_with_per_stage_layers(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    stages = [{"targets": "attention", "steps": 1, "layers": "top:1"}, {"targets": "mlp", "layers": [0]}]
    names, layers = stage_targets_union(stages, "all", model)
    assert layers == "all"
    assert names == [f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
        f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]


def test_unknown_stage_target_fails_before_training(tiny_llama_dir, copy_task_file, tmp_path):
    recipe = tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "run",
                         adapter={"stages": [{"targets": "attention", "steps": 2}, {"targets": "nope_proj"}]})
    with pytest.raises(DeftuneError, match=r"adapter.stages\[1\]|nope_proj"):
        train(recipe, progress=False)
