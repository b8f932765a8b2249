"""The CLI's contract with scripts: exit codes, one-line errors, ``eval --json`` on failure."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe, wire_trainer

from deftune import api
from deftune.cli import build_parser, main
from deftune.config import recipe_to_dict
from deftune.training.loop import TrainingInterrupted

pytestmark = pytest.mark.usefixtures("one_thread")


def test_help_documents_the_exit_codes():
    text = build_parser().format_help()
    for line in ("0    ok", "2    user error", "130  interrupted", "143  stopped by SIGTERM", "1    internal"):
        assert line in text


def test_missing_run_folder_is_a_user_error_naming_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "runs/typo", "--data", "demo-eval"]) == 2
    err = capsys.readouterr().err
    assert "runs/typo" in err and "does not exist" in err and "hub" in err and "Traceback" not in err


def test_eval_json_prints_the_error_on_stdout(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing"), "--data", "demo-eval", "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert "nothing" in out["error"] and out["exit_code"] == 2


def test_internal_error_gives_a_short_message_and_the_traceback_file(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(api, "evaluate", broken)
    assert main(["eval", "default", "--data", "demo-eval", "--json"]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "internal error (RuntimeError: an internal bug)" in captured.err
    where = Path(captured.err.split("full traceback in ")[1].split(". Please")[0])
    saved = where.read_text()
    assert "Traceback" in saved and "in broken" in saved and "an internal bug" in saved
    assert json.loads(captured.out)["exit_code"] == 1
    where.unlink()


def test_ctrl_c_exits_130(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "generate", interrupted)
    assert main(["generate", "default", "hi"]) == 130


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("carries_signum", [True, False])
def test_interrupted_training_exit_code_follows_the_signal(monkeypatch, capsys, signum, code, carries_signum):
    def stopped(*args, **kwargs):
        message = f"Stopped by signal {signal.Signals(signum).name} at step 3; checkpoint saved"
        raise TrainingInterrupted(message, signum if carries_signum else None)

    monkeypatch.setattr(api, "train", stopped)
    assert main(["train", "x.yaml"]) == code
    assert "checkpoint saved" in capsys.readouterr().err


def test_sigterm_during_training_exits_143_with_a_checkpoint(tiny_llama_dir, copy_task_file, tmp_path,
                                                            monkeypatch, capsys):
    trainer = wire_trainer(monkeypatch)
    trainer.stop_at = 2
    recipe = tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "run", train={"max_steps": 6})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_to_dict(recipe)))
    assert main(["train", str(path), "--no-progress"]) == 143
    err = capsys.readouterr().err
    assert "SIGTERM" in err and "train.resume=auto" in err and "Traceback" not in err
    assert (tmp_path / "run" / "checkpoints" / "step-0000002").is_dir()
