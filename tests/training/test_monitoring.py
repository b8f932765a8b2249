"""Issue: training you can watch and steer — guard, plateau, heatmap, TensorBoard, report, augmentation."""

import json

import pytest
import torch
from conftest import tiny_recipe

from deftune.api import train
from deftune.training import loop
from deftune.training.monitor import GradNormGuard, PlateauController
from deftune.training.report import ineffective_modules


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _spike_at(monkeypatch, step, factor=1e4, micro=2):
    """Scale the training loss of optimizer step ``step`` so its gradient norm jumps."""
    from deftune.training import loss as loss_module

    real = loss_module.response_loss_sum
    calls = {"n": 0}

    def spiked(model, batch):
        value, n = real(model, batch)
        if not model.training:
            return value, n
        calls["n"] += 1
        return (value * factor, n) if (calls["n"] - 1) // micro + 1 == step else (value, n)

    monkeypatch.setattr(loop, "response_loss_sum", spiked)


GUARD = {"guard_warmup": 4, "guard_window": 20, "guard_sigma": 3.0}


def test_guard_stops_at_the_injected_spike(tiny_llama_dir, copy_task_file, tmp_path, monkeypatch):
    _spike_at(monkeypatch, step=9)
    run = tmp_path / "run"
    recipe = tiny_recipe(tiny_llama_dir, copy_task_file, run, train={"max_steps": 12, "lr": 1e-3},
                         monitor={**GUARD, "guard": "stop"})
    with pytest.raises(loop.TrainingStopped, match=r"step 9 had grad norm .* z = "):
        train(recipe, progress=False)
    spikes = [r for r in _records(run) if r.get("event") == "grad_spike"]
    assert [(s["step"], s["action"]) for s in spikes] == [(9, "stop")] and spikes[0]["z"] > 3
    assert (run / "checkpoints" / "step-0000008").is_dir()


def test_guard_skip_drops_exactly_that_update(tiny_llama_dir, copy_task_file, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    _spike_at(monkeypatch, step=9)
    run = tmp_path / "run"
    recipe = tiny_recipe(tiny_llama_dir, copy_task_file, run,
                         train={"max_steps": 12, "lr": 1e-3, "save_every": 1, "keep_last": 20},
                         monitor={**GUARD, "guard": "skip"})
    summary = train(recipe, progress=False)
    assert summary.steps == 12 and summary.skipped_steps == 1
    spikes = [(r["step"], r["action"]) for r in _records(run) if r.get("event") == "grad_spike"]
    assert spikes == [(9, "skip")]
    before = load_file(str(run / "checkpoints" / "step-0000008" / "state.safetensors"))
    after = load_file(str(run / "checkpoints" / "step-0000009" / "state.safetensors"))
    after10 = load_file(str(run / "checkpoints" / "step-0000010" / "state.safetensors"))
    params = [k for k in before if k.startswith("param.")]
    assert all(torch.equal(before[k], after[k]) for k in params)  # step 9: no update
    assert any(not torch.equal(after[k], after10[k]) for k in params)  # step 10: training goes on


def test_guard_band_and_spike_rule():
    guard = GradNormGuard(k=3.0, window=10, warmup=4)
    for g in (1.0, 1.1, 0.9, 1.0):
        assert guard.check(g) is None
    z = guard.check(5.0)
    assert z is not None and z > 3
    assert len(guard.history) == 4  # the spike is not added to the band
    assert guard.check(1.05) is None


def test_plateau_reduces_after_the_third_non_improving_evaluation():
    ctl = PlateauController("eval_loss", patience=3, factor=0.5, min_scale=0.2)
    outcomes = [ctl.update(v) for v in (1.0, 1.1, 1.2, 1.3)]
    assert [o["reduced"] for o in outcomes] == [False, False, False, True] and ctl.scale == 0.5
    outcomes = [ctl.update(v) for v in (1.4, 1.5, 1.6)]
    assert outcomes[-1]["reduced"] and ctl.scale == 0.25
    [ctl.update(v) for v in (1.7, 1.8, 1.9)]
    assert ctl.scale == 0.2  # floor
    ctl = PlateauController("exact_match", patience=3)
    assert ctl.update(0.5)["best"] and not ctl.update(0.4)["best"] and ctl.update(0.6)["best"]


def test_trainer_lowers_lr_right_after_third_bad_evaluation(tiny_llama_dir, copy_task_file, tmp_path,
                                                           monkeypatch):
    scripted = iter([1.0, 1.1, 1.2, 1.3, 1.4, 1.5])
    lrs = {}

    def fake_validate(self, bar=None):
        metrics = {"eval_loss": next(scripted)}
        self.log({"step": self.step, **metrics})
        return metrics

    original_step = loop.Trainer.train_step

    def recording_step(self):
        lrs[self.step + 1] = self.optimizer.param_groups[0]["lr"]  # the LR this update will use
        return original_step(self)

    monkeypatch.setattr(loop.Trainer, "validate", fake_validate)
    monkeypatch.setattr(loop.Trainer, "train_step", recording_step)
    run = tmp_path / "run"
    recipe = tiny_recipe(tiny_llama_dir, copy_task_file, run,
                         train={"max_steps": 6, "lr": 1e-3, "warmup": 0, "schedule": "constant"},
                         eval={"every": 1, "plateau_patience": 3, "plateau_factor": 0.5})
    train(recipe, progress=False)
    assert [lrs[s] for s in range(1, 7)] == pytest.approx([1e-3] * 4 + [5e-4] * 2)
    events = [r for r in _records(run) if r.get("event") in ("lr_reduced", "best")]
    assert [(e["event"], e["step"]) for e in events] == [("best", 1), ("lr_reduced", 4)]
    assert (run / "best" / "adapter_model.safetensors").is_file()


def test_early_stop_after_patience(tiny_llama_dir, copy_task_file, tmp_path, monkeypatch):
    scripted = iter([1.0, 1.1, 1.2, 1.3, 1.4, 1.5])

    def fake_validate(self, bar=None):
        return {"eval_loss": next(scripted)}

    monkeypatch.setattr(loop.Trainer, "validate", fake_validate)
    recipe = tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "run", train={"max_steps": 6},
                         eval={"every": 1, "early_stop_patience": 2})
    assert train(recipe, progress=False).steps == 3


def test_frozen_adapter_shows_as_ineffective(tiny_llama_dir, copy_task_file, tmp_path, monkeypatch):
    from deftune.recipes import sft

    original = sft.prepare_model

    def freeze_one(recipe, model, device):
        spec = original(recipe, model, device)
        model.get_submodule("model.layers.0.self_attn.q_proj").lora_B.weight.requires_grad_(False)
        return spec

    monkeypatch.setattr(sft, "prepare_model", freeze_one)
    run = tmp_path / "run"
    train(tiny_recipe(tiny_llama_dir, copy_task_file, run, monitor={"heatmap_every": 3}), progress=False)
    heatmaps = [r for r in _records(run) if r.get("event") == "update_heatmap"]
    assert [h["step"] for h in heatmaps] == [3, 6]
    flagged = ineffective_modules(heatmaps[-1], 0.1)
    assert [(layer, m) for layer, m, _ in flagged] == [(0, "q_proj")]


def test_tensorboard_tags_report_and_augmentation(tiny_llama_dir, copy_task_file, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    recipe = tiny_recipe(tiny_llama_dir, copy_task_file, run, train={"max_steps": 10, "micro_batch": 8,
                                                                      "grad_accum": 1},
                         data={"augment_fraction": 0.1, "max_length": 200},
                         eval={"every": 5, "samples": 3, "max_new_tokens": 4},
                         monitor={"tensorboard": True, "report": True, "heatmap_every": 5})
    train(recipe, progress=False)
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/peak_mem_gib",
                "grad_norm/layer_0", "grad_norm/layer_1", "eval/eval_loss", "eval/eval_ppl", "eval/bleu4",
                "eval/rougeL", "eval/exact_match", "eval/token_f1", "update/L0/q_proj", "data/augmented"):
        assert tag in scalars, tag
    assert "update_heatmap" in events.Tags()["images"]
    assert (run / "report.md").is_file() and (run / "plots" / "loss.png").is_file()
    assert (run / "heatmaps" / "step-0000005.png").is_file()
    augmented = [r for r in _records(run) if r.get("event") == "augmented"]
    # 38 training records, micro-batch 8 -> 5 batches an epoch, so 10 steps span epochs 0 and 1.
    assert [(a["epoch"], a["replaced"]) for a in augmented] == [(0, 4), (1, 4)]
