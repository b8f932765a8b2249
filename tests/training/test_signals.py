"""A signal in the last phase of a run (the final save, the final evaluation) loses nothing: the final
checkpoint and the result are on disk, the message says so, and train.resume=auto finishes the run
without redoing a step."""

import json
import os
import signal

import pytest
from conftest import tiny_recipe

from deftune.api import train
from deftune.recipes import sft
from deftune.training import loop

SECTIONS = {"train": {"max_steps": 4}}


def _unhandled(signum, _frame):
    raise AssertionError(f"{signal.Signals(signum).name} reached the handler outside the run")


@pytest.fixture(autouse=True)
def outside_handlers():
    """A signal the run does not handle fails the test instead of killing (or aborting) pytest."""
    previous = {s: signal.signal(s, _unhandled) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_final_evaluation_keeps_the_adapter_and_resumes(tiny_llama_dir, copy_task_file, tmp_path,
                                                                      monkeypatch, sig):
    real = sft.validation_metrics
    calls = {"n": 0}

    def signalled_in_the_final_evaluation(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # 1: before training; 2: the final evaluation
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(sft, "validation_metrics", signalled_in_the_final_evaluation)
    run = tmp_path / "run"
    with pytest.raises(loop.TrainingInterrupted, match="during the final evaluation") as stopped:
        train(tiny_recipe(tiny_llama_dir, copy_task_file, run, **SECTIONS), progress=False)
    assert stopped.value.signal_number == sig
    assert signal.Signals(sig).name in str(stopped.value) and "train.resume=auto" in str(stopped.value)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "checkpoints" / "step-0000004").is_dir()
    assert not (run / "summary.json").exists()
    assert signal.getsignal(sig) is _unhandled  # the run's handlers removed, the previous ones back
    monkeypatch.setattr(sft, "validation_metrics", real)

    summary = train(tiny_recipe(tiny_llama_dir, copy_task_file, run, train={"max_steps": 4, "resume": "auto"}),
                    progress=False)
    assert summary.steps == 4 and summary.after
    rows = _rows(run)
    marker = next(i for i, r in enumerate(rows) if r.get("event") == "resume")
    assert rows[marker]["from_step"] == 4
    assert not [r for r in rows[marker:] if "loss" in r]  # no step redone
    assert (run / "summary.json").is_file()


def test_signal_during_the_final_save_still_writes_checkpoint_and_adapter(tiny_llama_dir, copy_task_file,
                                                                          tmp_path, monkeypatch):
    real = loop.Trainer.save

    def signalled_while_saving(self):
        if self.phase == "saving":
            os.kill(os.getpid(), signal.SIGTERM)  # arrives as the final checkpoint is being written
        return real(self)

    monkeypatch.setattr(loop.Trainer, "save", signalled_while_saving)
    run = tmp_path / "run"
    with pytest.raises(loop.TrainingInterrupted, match="while saving the result") as stopped:
        train(tiny_recipe(tiny_llama_dir, copy_task_file, run, **SECTIONS), progress=False)
    assert stopped.value.signal_number == signal.SIGTERM
    assert "checkpoints/step-0000004" in str(stopped.value) and str(run / "adapter") in str(stopped.value)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "checkpoints" / "step-0000004" / "state.safetensors").is_file()


def test_signal_during_training_checkpoints_the_last_completed_step(tiny_llama_dir, copy_task_file, tmp_path,
                                                                    monkeypatch):
    real = loop.Trainer.train_step

    def signalled_in_step_two(self):
        out = real(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(loop.Trainer, "train_step", signalled_in_step_two)
    run = tmp_path / "run"
    with pytest.raises(loop.TrainingInterrupted, match="SIGINT at step 2") as stopped:
        train(tiny_recipe(tiny_llama_dir, copy_task_file, run, **SECTIONS), progress=False)
    assert stopped.value.signal_number == signal.SIGINT
    assert (run / "checkpoints" / "step-0000002").is_dir()
    assert not (run / "adapter").exists()
