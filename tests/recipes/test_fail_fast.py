"""A training run refuses bad values, bad data and unusable run folders before it loads the model: one
line naming the key, file or path, exit code 2, no traceback, no folder left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe, write_copy_task

from deftune import cli
from deftune.config import save_recipe
from deftune.recipes import sft


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the run gets as far as loading the model (the check must come before it)."""
    def load_model(*args, **kwargs):
        pytest.fail("the model was loaded before the error was found")

    monkeypatch.setattr(sft, "load_model", load_model)


@pytest.fixture
def workspace(tmp_path, tiny_llama_dir):
    """A recipe file for the tiny model and a data file, in a folder of their own; ``run`` is where the
    run folder would go."""
    data = write_copy_task(tmp_path / "data.jsonl", n=12)
    recipe = tmp_path / "recipe.yaml"
    save_recipe(tiny_recipe(tiny_llama_dir, data, tmp_path / "runs" / "run"), recipe)
    return {"dir": tmp_path, "recipe": recipe, "data": data, "run": tmp_path / "runs" / "run"}


def train_fails(workspace, capsys, *overrides: str) -> str:
    """Run ``deftune train`` and return its one-line error (exit code 2, no traceback)."""
    before = sorted(p.name for p in workspace["dir"].iterdir())
    code = cli.main(["train", str(workspace["recipe"]), "--no-progress", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("deftune: error:")]
    assert len(lines) == 1, err
    assert sorted(p.name for p in workspace["dir"].iterdir()) == before  # no run folder left
    return lines[0]


BAD_VALUES = [
    ("train.lr", "nan"), ("train.betas", "[5,7]"), ("train.epochs", "-1"), ("eval.every", "-1"),
    ("train.save_every", "-2"), ("adapter.alpha", "-8"), ("train.weight_decay", "-0.1"),
]


@pytest.mark.parametrize("key,value", BAD_VALUES, ids=[f"{k}={v}" for k, v in BAD_VALUES])
def test_bad_value_fails_before_loading(workspace, capsys, no_model_load, key, value):
    assert key in train_fails(workspace, capsys, f"{key}={value}")


def test_unwritable_output_dir(workspace, capsys, no_model_load):
    assert "/proc/deftune-x" in train_fails(workspace, capsys, "output_dir=/proc/deftune-x")
    assert not Path("/proc/deftune-x").exists()


def test_empty_output_dir(workspace, capsys, no_model_load):
    assert "output_dir is empty" in train_fails(workspace, capsys, "output_dir=")


def test_root_output_dir(workspace, capsys, no_model_load):
    assert "output_dir=/ is the root" in train_fails(workspace, capsys, "output_dir=/")


def test_output_dir_is_an_existing_file(workspace, capsys, no_model_load):
    existing = workspace["dir"] / "notes.txt"
    existing.write_text("mine")
    message = train_fails(workspace, capsys, f"output_dir={existing}")
    assert str(existing) in message and "existing file" in message
    assert existing.read_text() == "mine"


def test_malformed_data_line_names_file_and_line(workspace, capsys, no_model_load):
    data = workspace["data"]
    lines = data.read_text().splitlines()
    lines[6] = '{"query": "copy: the dog", "response": '
    data.write_text("\n".join(lines) + "\n")
    assert f"{data}:7: invalid JSON" in train_fails(workspace, capsys)


def test_record_of_the_wrong_shape_names_file_and_line(workspace, capsys, no_model_load):
    data = workspace["data"]
    lines = data.read_text().splitlines()
    lines[4] = json.dumps({"query": "copy: the dog", "answer": "the dog"})
    data.write_text("\n".join(lines) + "\n")
    message = train_fails(workspace, capsys)
    assert f"{data}:5" in message and "missing response" in message


def test_missing_data_file(workspace, capsys, no_model_load):
    missing = workspace["dir"] / "nope" / "train.jsonl"
    message = train_fails(workspace, capsys, f"data.train={missing}")
    assert "Data file not found" in message and str(missing) in message


def test_failure_while_loading_leaves_no_folder(workspace, capsys, monkeypatch):
    """The folder made to check output_dir is writable is gone again when the run fails before training."""
    from deftune.errors import DeftuneError

    def load_model(*args, **kwargs):
        raise DeftuneError("the model is broken")

    monkeypatch.setattr(sft, "load_model", load_model)
    assert "the model is broken" in train_fails(workspace, capsys)
    assert not workspace["run"].exists() and not workspace["run"].parent.exists()


def test_run_folder_of_a_failed_start_is_reused(workspace, capsys, monkeypatch):
    """A start that failed at its first step left recipe.yaml and set-up records; the next try writes
    into the same folder (not run-2), and its metrics hold no record of the failed start."""
    from deftune.errors import DeftuneError
    from deftune.training import loop

    def fail_first_step(self):
        raise DeftuneError("out of memory (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(loop.Trainer, "train_step", fail_first_step)
        code = cli.main(["train", str(workspace["recipe"]), "--no-progress", "train.max_steps=2"])
    assert code == 2 and "out of memory (simulated)" in capsys.readouterr().err
    run = workspace["run"]
    assert (run / "recipe.yaml").is_file()

    assert cli.main(["train", str(workspace["recipe"]), "--no-progress", "train.max_steps=2"]) == 0
    assert not run.with_name("run-2").exists()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert [r.get("phase") for r in records].count("before") == 1  # the failed start's records are gone


def test_fresh_run_dir_reuses_only_a_failed_start(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump({"output_dir": str(run)}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "phase": "before", "eval_loss": 3.0}) + "\n"
                                       + json.dumps({"step": 1, "epoch": 0, "event": "augmented"}) + "\n")
    (run / "events.out.tfevents.1.host").write_bytes(b"")
    assert sft.fresh_run_dir(run, "") == run and list(run.iterdir()) == []

    # A run that trained (a step logged, or a checkpoint) is kept: the next run goes to run-2.
    (run / "recipe.yaml").write_text(yaml.safe_dump({"output_dir": str(run)}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    assert sft.fresh_run_dir(run, "") == tmp_path / "run-2"
    (run / "metrics.jsonl").unlink()
    (run / "checkpoints").mkdir()
    assert sft.fresh_run_dir(run, "") == tmp_path / "run-2"
    assert sft.fresh_run_dir(run, "auto") == run and (run / "recipe.yaml").is_file()

    # A folder the user keeps other things in, or whose recipe.yaml is not this run's, is never cleared.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "recipe.yaml").write_text(yaml.safe_dump({"output_dir": "elsewhere"}))
    assert sft.fresh_run_dir(mine, "") == tmp_path / "mine-2" and (mine / "recipe.yaml").is_file()


def test_probe_leaves_an_existing_folder_and_its_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("x")
    sft.probe_run_dir(run)
    assert sorted(os.listdir(run)) == ["keep.txt"]
