import json
import math
import signal

import pytest
import torch
from conftest import tiny_recipe

from deftune.api import train
from deftune.training import loop
from deftune.training.checkpoint import find_checkpoint
from deftune.training.optim import lr_factor


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_loss_falls_and_run_folder_is_complete(tiny_llama_dir, copy_task_file, tmp_path):
    recipe = tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "run", train={"max_steps": 12})
    summary = train(recipe, progress=False)
    run = tmp_path / "run"
    losses = _losses(run)
    assert len(losses) == 12
    assert losses[12] < losses[1]
    assert (run / "recipe.yaml").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert summary.after["eval_loss"] < summary.before["eval_loss"]
    assert (run / "summary.json").is_file()


def test_same_seed_repeats_exactly(tiny_llama_dir, copy_task_file, tmp_path):
    a = tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "a", adapter={"dropout": 0.1})
    b = tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "b", adapter={"dropout": 0.1})
    train(a, progress=False)
    train(b, progress=False)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_resume_continues_the_same_trajectory(tiny_llama_dir, copy_task_file, tmp_path, monkeypatch):
    sections = dict(adapter={"dropout": 0.1}, train={"max_steps": 6, "save_every": 100})
    train(tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "full", **sections), progress=False)
    reference = _losses(tmp_path / "full")

    original = loop.Trainer.train_step

    def interrupt_after_three(self):
        out = original(self)
        if self.step == 3:
            self._stop_signal = signal.SIGTERM  # as if SIGTERM arrived during step 3
        return out

    monkeypatch.setattr(loop.Trainer, "train_step", interrupt_after_three)
    with pytest.raises(loop.TrainingInterrupted, match="SIGTERM at step 3"):
        train(tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "cut", **sections), progress=False)
    monkeypatch.setattr(loop.Trainer, "train_step", original)
    assert find_checkpoint(tmp_path / "cut", "auto").name == "step-0000003"

    sections["train"]["resume"] = "auto"
    summary = train(tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "cut", **sections), progress=False)
    assert summary.steps == 6
    resumed = _losses(tmp_path / "cut")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), step


def test_checkpoints_are_atomic_and_pruned(tiny_llama_dir, copy_task_file, tmp_path):
    run = tmp_path / "run"
    recipe = tiny_recipe(tiny_llama_dir, copy_task_file, run, train={"max_steps": 6, "save_every": 1,
                                                                     "keep_last": 2})
    train(recipe, progress=False)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest.json", "step-0000005", "step-0000006"]
    # A crash mid-write leaves only a temporary folder, which resume never picks.
    (run / "checkpoints" / ".tmp-step-0000007-1").mkdir()
    (run / "checkpoints" / "latest.json").unlink()
    assert find_checkpoint(run, "auto").name == "step-0000006"


def test_nonfinite_steps_are_skipped_then_stop_with_good_state(tiny_llama_dir, copy_task_file, tmp_path,
                                                                monkeypatch):
    from safetensors.torch import load_file

    from deftune.training import loss as loss_module

    real = loss_module.response_loss_sum
    calls = {"n": 0}

    def poisoned(model, batch):
        value, n = real(model, batch)
        if not model.training:  # evaluation passes stay clean
            return value, n
        calls["n"] += 1
        return (value * float("nan"), n) if calls["n"] > 4 else (value, n)  # from step 3 on (2 micro each)

    monkeypatch.setattr(loop, "response_loss_sum", poisoned)
    run = tmp_path / "run"
    recipe = tiny_recipe(tiny_llama_dir, copy_task_file, run, train={"save_every": 1, "keep_last": 10})
    with pytest.raises(loop.TrainingStopped, match=r"Non-finite loss at step 5 \(3 step\(s\) in a row.*Last good state"):
        train(recipe, progress=False)
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    nonfinite = [(e["step"], e["action"]) for e in events if e.get("event") == "nonfinite"]
    assert nonfinite == [(3, "skip"), (4, "skip"), (5, "stop")]
    good = load_file(str(run / "checkpoints" / "step-0000002" / "state.safetensors"))
    last = load_file(str(find_checkpoint(run, "auto") / "state.safetensors"))
    params = [k for k in good if k.startswith("param.")]
    assert params and all(torch.equal(good[k], last[k]) for k in params)


def test_existing_run_is_never_overwritten(tiny_llama_dir, copy_task_file, tmp_path):
    run = tmp_path / "run"
    train(tiny_recipe(tiny_llama_dir, copy_task_file, run, train={"max_steps": 1}), progress=False)
    first = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    summary = train(tiny_recipe(tiny_llama_dir, copy_task_file, run, train={"max_steps": 1}), progress=False)
    assert summary.run_dir.endswith("run-2")
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == first


def test_schedule_warmup_then_cosine_floor():
    assert lr_factor(0, 100, 10, "cosine", 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(77, 100, 10, "constant", 0.0) == 1.0


def test_gradient_accumulation_weighs_tokens_equally(tiny_llama_dir, copy_task_file, tmp_path):
    """micro_batch 8 x accum 1 and micro_batch 4 x accum 2 see the same batch -> the same first loss."""
    a = tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "a", train={"max_steps": 1, "micro_batch": 8,
                                                                           "grad_accum": 1})
    b = tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "b", train={"max_steps": 1, "micro_batch": 4,
                                                                           "grad_accum": 2})
    train(a, progress=False)
    train(b, progress=False)
    la, lb = _losses(tmp_path / "a")[1], _losses(tmp_path / "b")[1]
    assert math.isfinite(la)
    # Same seed -> the same shuffled order, so step 1 sees the same 8 samples split 1x8 or 2x4; the loss is
    # summed over tokens and divided by the step's token count, so both splits agree to float precision.
    assert la == pytest.approx(lb, rel=1e-4)


def test_full_method_trains_only_chosen_modules(tiny_llama_dir, copy_task_file, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "full"
    recipe = tiny_recipe(tiny_llama_dir, copy_task_file, run, method="full",
                         adapter={"targets": "attention", "layers": "top:1"}, train={"max_steps": 3, "lr": 1e-3})
    summary = train(recipe, progress=False)
    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    tuned = load_file(str(run / "model" / "model.safetensors"))
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed == {f"model.layers.1.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert summary.trainable_params == sum(base[k].numel() for k in changed)


def test_epochs_set_the_step_count(tiny_llama_dir, copy_task_file, tmp_path):
    # 48 records, 20% eval -> 38 train; micro 4 -> 10 micro-batches; accum 2 -> 5 steps per epoch.
    recipe = tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "run", train={"max_steps": 0, "epochs": 2})
    assert train(recipe, progress=False).steps == 10


def test_gradient_checkpointing_gives_the_same_losses(tiny_llama_dir, copy_task_file, tmp_path):
    plain = tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "plain", train={"max_steps": 3})
    ckpt = tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "ckpt",
                       train={"max_steps": 3, "gradient_checkpointing": True})
    train(plain, progress=False)
    train(ckpt, progress=False)
    a, b = _losses(tmp_path / "plain"), _losses(tmp_path / "ckpt")
    assert a.keys() == b.keys()
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5)


def test_packing_trains_on_the_same_tokens(tiny_llama_dir, copy_task_file, tmp_path):
    run = tmp_path / "packed"
    recipe = tiny_recipe(tiny_llama_dir, copy_task_file, run, data={"packing": True, "max_length": 64},
                         train={"max_steps": 6, "micro_batch": 2})
    summary = train(recipe, progress=False)
    losses = _losses(run)
    assert losses[6] < losses[1]
    assert summary.after["eval_loss"] < summary.before["eval_loss"]


def test_tokenizer_without_pad_token_falls_back_to_eos(tmp_path, copy_task_file, capsys):
    from conftest import make_tiny_tokenizer, save_tiny_llama

    folder = save_tiny_llama(tmp_path / "nopad")
    make_tiny_tokenizer(pad=False).save_pretrained(folder)
    train(tiny_recipe(folder, copy_task_file, tmp_path / "run", train={"max_steps": 1}), progress=False)
    assert "pad" in capsys.readouterr().out.lower()
