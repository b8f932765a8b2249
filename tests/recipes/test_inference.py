"""Jobs on a finished run: a run folder never switches on a model folder's own code; eval scores every
record of the file it is given."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe, write_copy_task

import deftune
from deftune.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

PLANTED_MODULE = '''import pathlib

pathlib.Path({marker!r}).write_text("remote code ran")

from transformers import LlamaConfig, LlamaForCausalLM


class PlantedConfig(LlamaConfig):
    model_type = "planted_llama"


class PlantedForCausalLM(LlamaForCausalLM):
    config_class = PlantedConfig
'''


@pytest.fixture(scope="module")
def finished_run(tiny_llama_dir, tmp_path_factory):
    """A 2-step LoRA run whose recipe caps eval at 8 records and splits 20% off for eval."""
    root = tmp_path_factory.mktemp("finished")
    data = write_copy_task(root / "train.jsonl", n=24)
    recipe = tiny_recipe(tiny_llama_dir, data, root / "run", train={"max_steps": 2},
                         data={"max_eval_records": 8, "max_train_records": 12})
    return Path(deftune.train(recipe, progress=False).run_dir)


def _planted_run(finished_run, tiny_llama_dir, tmp_path):
    """A copy of ``finished_run`` whose recipe.yaml points at a model folder with an ``auto_map`` module
    that writes a marker file when imported, and asks for remote code."""
    marker = tmp_path / "marker"
    model = tmp_path / "planted_model"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="planted_llama", architectures=["PlantedForCausalLM"],
                  auto_map={"AutoConfig": "planted.PlantedConfig",
                            "AutoModelForCausalLM": "planted.PlantedForCausalLM"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "planted.py").write_text(PLANTED_MODULE.format(marker=str(marker)))
    run = tmp_path / "shared_run"
    shutil.copytree(finished_run, run)
    tree = yaml.safe_load((run / "recipe.yaml").read_text())
    tree["model"]["path"] = str(model)
    tree["model"]["trust_remote_code"] = True
    (run / "recipe.yaml").write_text(yaml.safe_dump(tree))
    return run, marker


def test_run_folder_never_enables_remote_code(finished_run, tiny_llama_dir, copy_task_file, tmp_path,
                                              monkeypatch, capsys):
    from transformers import dynamic_module_utils

    # Where transformers copies a trusted module before importing it: this test's folder, not ~/.cache.
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    run, marker = _planted_run(finished_run, tiny_llama_dir, tmp_path)
    commands = [
        ["eval", str(run), "--data", str(copy_task_file), "--device", "cpu"],
        ["generate", str(run), "copy: a b", "--max-new-tokens", "2", "--device", "cpu"],
        ["merge", str(run), "--out", str(tmp_path / "merged")],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "--trust-remote-code" in err and "Traceback" not in err, err
        assert not marker.exists(), f"deftune {argv[0]} ran the model folder's code"
    # The person at the keyboard asks for it: the module runs (so the checks above can fail).
    metrics = deftune.evaluate(str(run), str(copy_task_file), device="cpu", trust_remote_code=True)
    assert marker.read_text() == "remote code ran"
    assert metrics["records"] == 48


def test_eval_scores_every_record_of_the_file(finished_run, tmp_path, capsys):
    data = write_copy_task(tmp_path / "forty.jsonl", n=40, seed=3)
    assert yaml.safe_load((finished_run / "recipe.yaml").read_text())["data"]["max_eval_records"] == 8
    assert main(["eval", str(finished_run), "--data", str(data), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 40
    assert main(["eval", str(finished_run), "--data", str(data), "--device", "cpu", "--json",
                 "--max-records", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 5
    assert deftune.evaluate(str(finished_run), str(data), device="cpu", max_records=7)["records"] == 7


def test_eval_checks_the_data_before_loading_the_model(finished_run, tmp_path, monkeypatch, capsys):
    from deftune.recipes import inference

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(inference, "_load", no_load)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "response": "r"}\n{not json\n')
    assert main(["eval", str(finished_run), "--data", str(bad), "--json"]) == 2
    captured = capsys.readouterr()
    assert "bad.jsonl" in json.loads(captured.out)["error"] and "Traceback" not in captured.err


def test_merge_of_a_model_folder_is_refused_before_loading(tiny_llama_dir, tmp_path, capsys):
    assert main(["merge", str(tiny_llama_dir), "--out", str(tmp_path / "m")]) == 2
    assert "not a run folder" in capsys.readouterr().err
