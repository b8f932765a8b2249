"""Gradient masks: what the mask excludes stays bitwise unchanged (AdamW weight decay included)."""

import json
from fnmatch import fnmatchcase

import pytest
import torch
from conftest import tiny_recipe, wire_trainer

from deftune.api import train
from deftune.errors import DeftuneError
from deftune.training import loop
from deftune.training.callbacks import masks
from deftune.training.fisher import top_k_mask


class Probe(loop.Callback):
    """Snapshots every parameter at train start and at the end; counts AdamW state after step 1;
    ``trainable`` is what the method made trainable, before any callback ran."""

    name = "probe"

    def on_trainer_init(self, trainer):
        self.trainable = {n: p.numel() for n, p in trainer.model.named_parameters() if p.requires_grad}

    def on_train_start(self, trainer):
        self.before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        self.mask = next((cb for cb in trainer.callbacks if cb.name == "gradient_mask"), None)

    def after_optimizer_step(self, trainer):
        if trainer.step == 0:
            self.state_elements = sum(st["exp_avg"].numel() for st in trainer.optimizer.state.values())

    def on_step_end(self, trainer):
        if trainer.step == trainer.total_steps:
            self.after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def wire(monkeypatch, *extra):
    return wire_trainer(monkeypatch, *extra)


def run(tmp_path, model_dir, data, monkeypatch, name="run", **sections):
    sections.setdefault("train", {})
    sections["train"] = {"max_steps": 3, "weight_decay": 0.1, "lr": 1e-2, **sections["train"]}
    probe = Probe()
    wire(monkeypatch, probe)
    train(tiny_recipe(model_dir, data, tmp_path / name, **sections), progress=False)
    return probe


def changed(probe):
    return {n for n in probe.before if not torch.equal(probe.before[n], probe.after[n])}


@pytest.mark.parametrize("method,mask,allowed", [
    ("lora", {"modules": ["*.self_attn.*"]}, lambda n: ".self_attn." in n and ".lora_" in n),
    ("lora", {"layers": "top:1"}, lambda n: n.startswith("model.layers.1.") and ".lora_" in n),
    ("full", {"modules": ["*.mlp.*"]}, lambda n: ".mlp." in n),
    ("full", {"layers": [0], "modules": ["*.q_proj.*", "*.down_proj.*"]},
     lambda n: n.startswith("model.layers.0.") and (".q_proj." in n or ".down_proj." in n)),
])
def test_name_and_layer_masks_freeze_the_rest(tiny_llama_dir, copy_task_file, tmp_path, monkeypatch,
                                              method, mask, allowed):
    probe = run(tmp_path, tiny_llama_dir, copy_task_file, monkeypatch, method=method, mask=mask)
    trainable_before = set(probe.trainable)
    expect = {n for n in trainable_before if allowed(n)}
    assert expect and expect != trainable_before
    # lora_B of a LoRA pair starts at zero; both A and B move once trained.
    assert changed(probe) == expect
    # Optimizer state only for what may change.
    assert probe.state_elements == sum(probe.trainable[n] for n in expect)


def test_mask_leaving_nothing_trainable_names_the_patterns(tiny_llama_dir, copy_task_file, tmp_path, monkeypatch):
    with pytest.raises(DeftuneError, match=r"\*\.nothing\.\*"):
        run(tmp_path, tiny_llama_dir, copy_task_file, monkeypatch, mask={"modules": ["*.nothing.*"]})


def test_bad_mask_layers_is_a_config_error(tiny_llama_dir, copy_task_file, tmp_path, monkeypatch):
    with pytest.raises(DeftuneError, match="mask.layers"):
        run(tmp_path, tiny_llama_dir, copy_task_file, monkeypatch, mask={"layers": "top:9"})


@pytest.mark.parametrize("method,targets", [("lora", "all-linear"), ("full", "attention")])
def test_fisher_mask_keeps_exactly_k_and_freezes_the_rest_bitwise(tiny_llama_dir, copy_task_file, tmp_path,
                                                                   monkeypatch, method, targets):
    keep = 0.1
    probe = run(tmp_path, tiny_llama_dir, copy_task_file, monkeypatch, method=method,
                adapter={"targets": targets}, mask={"fisher_keep": keep, "fisher_batches": 3})
    masks_ = probe.mask.fisher_masks
    total = sum(probe.trainable.values())
    assert set(masks_) == set(probe.trainable)
    assert sum(m.numel() for m in masks_.values()) == total
    assert sum(int(m.sum()) for m in masks_.values()) == round(keep * total) == probe.mask.fisher_kept
    moved = 0
    for name, m in masks_.items():
        before, after = probe.before[name], probe.after[name]
        assert torch.equal(before[~m], after[~m]), name  # masked-out: bitwise, despite weight decay 0.1
        moved += int((before[m] != after[m]).sum())
    assert moved > 0.9 * probe.mask.fisher_kept
    # Everything outside the scored set (frozen base weights) is untouched too.
    for name in set(probe.before) - set(masks_):
        assert torch.equal(probe.before[name], probe.after[name]), name


def test_fisher_mask_on_lora_prefers_b_over_a(tiny_llama_dir, copy_task_file, tmp_path, monkeypatch):
    # B = 0 at step 0, so dL/dA = 0: A's Fisher is zero and small masks keep only B elements.
    probe = run(tmp_path, tiny_llama_dir, copy_task_file, monkeypatch, train={"max_steps": 1},
                mask={"fisher_keep": 0.05, "fisher_batches": 2})
    kept_a = sum(int(m.sum()) for n, m in probe.mask.fisher_masks.items() if ".lora_A." in n)
    kept_b = sum(int(m.sum()) for n, m in probe.mask.fisher_masks.items() if ".lora_B." in n)
    assert kept_a == 0 and kept_b == probe.mask.fisher_kept


def test_top_k_mask_is_exact_and_breaks_ties_by_seed():
    scores = torch.tensor([0.0, 3.0, 1.0, 1.0, 1.0, 1.0, 5.0, 0.0])
    a = top_k_mask(scores, 4, seed=0)
    assert int(a.sum()) == 4 and a[1] and a[6] and not a[0] and not a[7]
    assert torch.equal(a, top_k_mask(scores, 4, seed=0))
    assert int(top_k_mask(scores, 0, 0).sum()) == 0 and bool(top_k_mask(scores, 8, 0).all())
    zeros = torch.zeros(1000)
    picks = {tuple(torch.nonzero(top_k_mask(zeros, 10, seed=s)).squeeze(1).tolist()) for s in range(3)}
    assert len(picks) == 3  # ties are spread by the seed, not taken from the front


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_fisher_mask_resume_recomputes_the_same_mask(tiny_llama_dir, copy_task_file, tmp_path, monkeypatch):
    sections = dict(adapter={"dropout": 0.1}, mask={"fisher_keep": 0.2, "fisher_batches": 2},
                    train={"max_steps": 5, "save_every": 100, "weight_decay": 0.1})
    wire(monkeypatch)
    train(tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "full", **sections), progress=False)
    reference = _losses(tmp_path / "full")
    trainer_cls = wire(monkeypatch)
    trainer_cls.stop_at = 2
    with pytest.raises(loop.TrainingInterrupted):
        train(tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "cut", **sections), progress=False)
    trainer_cls.stop_at = None
    meta = json.loads((tmp_path / "cut" / "checkpoints" / "step-0000002" / "meta.json").read_text())
    assert len(meta["callbacks"]["gradient_mask"]["fisher_sha256"]) == 64
    sections["train"]["resume"] = "auto"
    train(tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "cut", **sections), progress=False)
    resumed = _losses(tmp_path / "cut")
    assert sorted(resumed) == sorted(reference)
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), step


def test_no_mask_means_no_callback(tiny_llama_dir, copy_task_file, tmp_path):
    recipe = tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "r", mask={"fisher_keep": 0.0})
    assert masks.from_recipe(recipe, torch.nn.Linear(2, 2)) is None
    assert fnmatchcase("model.layers.0.self_attn.q_proj.lora_A.weight", "*.self_attn.*")
