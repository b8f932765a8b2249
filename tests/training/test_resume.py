"""Resume past damaged checkpoints, refuse a changed recipe, mark resumes in metrics.jsonl, and write
errors (a full disk) as one message with the last good checkpoint intact."""

import errno
import json

import pytest
from conftest import tiny_recipe, wire_trainer

from deftune.api import train
from deftune.errors import DeftuneError
from deftune.training import checkpoint as ckpt
from deftune.training import loop
from deftune.training.report import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def sections(**train_keys):
    return {"adapter": {"dropout": 0.1}, "train": {"max_steps": 6, "save_every": 2, "keep_last": 5, **train_keys}}


def losses(run_dir) -> dict[int, float]:
    """Loss per step as the report reads it (a step redone after a resume keeps its later value)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)["train"]}


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, copy_task_file, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    train(tiny_recipe(tiny_llama_dir, copy_task_file, run, **sections()), progress=False)
    return losses(run)


def cut_run(tiny_llama_dir, copy_task_file, run, monkeypatch, stop_at=4):
    """A run stopped by SIGTERM after step ``stop_at`` (checkpoints at steps 2 and 4)."""
    trainer_cls = wire_trainer(monkeypatch)
    trainer_cls.stop_at = stop_at
    with pytest.raises(loop.TrainingInterrupted, match=f"SIGTERM at step {stop_at}"):
        train(tiny_recipe(tiny_llama_dir, copy_task_file, run, **sections()), progress=False)
    trainer_cls.stop_at = None


def resume(tiny_llama_dir, copy_task_file, run, **train_keys):
    return train(tiny_recipe(tiny_llama_dir, copy_task_file, run, **sections(resume="auto", **train_keys)),
                 progress=False)


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(tiny_llama_dir, copy_task_file, tmp_path,
                                                                    monkeypatch, capsys, reference):
    run = tmp_path / "run"
    cut_run(tiny_llama_dir, copy_task_file, run, monkeypatch)
    state = run / "checkpoints" / "step-0000004" / "state.safetensors"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    assert ckpt.checkpoint_problem(state.parent) is not None
    capsys.readouterr()

    summary = resume(tiny_llama_dir, copy_task_file, run)
    out = capsys.readouterr().out
    assert "step-0000004 is damaged" in out
    assert "Resumed from" in out and "step-0000002 at step 2/6" in out
    assert summary.steps == 6
    assert losses(run) == pytest.approx(reference, abs=1e-5)
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]


def test_truncated_latest_json_scans_the_step_folders(tiny_llama_dir, copy_task_file, tmp_path, monkeypatch,
                                                      capsys, reference):
    run = tmp_path / "run"
    cut_run(tiny_llama_dir, copy_task_file, run, monkeypatch)
    latest = run / "checkpoints" / "latest.json"
    latest.write_text(latest.read_text()[:7])
    capsys.readouterr()

    summary = resume(tiny_llama_dir, copy_task_file, run)
    out = capsys.readouterr().out
    assert "latest.json is unreadable" in out and "step-0000004 at step 4/6" in out
    assert summary.steps == 6
    assert losses(run) == pytest.approx(reference, abs=1e-5)


def test_every_damaged_checkpoint_means_no_resume_point(tmp_path):
    root = tmp_path / "checkpoints" / "step-0000002"
    root.mkdir(parents=True)
    (root / "meta.json").write_text('{"step": 2, "sha256": {"state.safetensors": "00"}}')
    (root / "state.safetensors").write_bytes(b"not tensors")
    warnings = []
    assert ckpt.find_checkpoint(tmp_path, "auto", warn=warnings.append) is None
    assert any("step-0000002 is damaged" in w for w in warnings)
    with pytest.raises(DeftuneError, match="damaged"):
        ckpt.find_checkpoint(tmp_path, str(root))


def test_resume_with_a_changed_seed_is_refused_unless_forced(tiny_llama_dir, copy_task_file, tmp_path,
                                                             monkeypatch):
    run = tmp_path / "run"
    cut_run(tiny_llama_dir, copy_task_file, run, monkeypatch)
    original = (run / "recipe.yaml").read_text()
    with pytest.raises(DeftuneError, match=r"train\.seed: 42 -> 7") as refused:
        resume(tiny_llama_dir, copy_task_file, run, seed=7)
    assert "train.resume_force" in str(refused.value)
    assert "train.save_every" not in str(refused.value)  # keys that do not change the run are free
    assert (run / "recipe.yaml").read_text() == original

    # A change that does not alter the trajectory is accepted as is.
    summary = resume(tiny_llama_dir, copy_task_file, run, seed=7, resume_force=True, keep_last=3)
    assert summary.steps == 6
    kept = (run / "recipe.yaml").read_text()
    assert kept.startswith(original)  # the original recipe stays; the resume is recorded after it
    assert "resumed" in kept and "train.seed: 42 -> 7" in kept
    from deftune.config import load_recipe
    assert load_recipe(run / "recipe.yaml").train.seed == 42  # still a valid recipe


def test_resume_differences_list_only_trajectory_keys():
    from deftune.config import Recipe, recipe_to_dict

    old = recipe_to_dict(Recipe())
    new = recipe_to_dict(Recipe())
    new["train"].update(micro_batch=3, log_every=5, resume="auto")
    new["adapter"]["alpha"] = 4.0
    new["eval"]["every"] = 10
    new["output_dir"] = "elsewhere"
    assert ckpt.resume_differences(old, new) == ["adapter.alpha: 32.0 -> 4.0", "train.micro_batch: 8 -> 3"]


def test_metrics_mark_the_resume_and_the_report_keeps_the_last_value(tmp_path):
    rows = [{"step": s, "loss": 1.0 + s} for s in range(1, 5)]
    rows += [{"step": 4, "event": "grad_spike", "grad_norm": 9.0, "z": 4.0, "action": "skip"}]
    rows += [{"step": 2, "event": "resume", "from_step": 2}]
    rows += [{"step": s, "loss": 0.5 + s} for s in range(3, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in metrics["train"]] == [(1, 2.0), (2, 3.0), (3, 3.5), (4, 4.5),
                                                                    (5, 5.5)]
    assert [e["event"] for e in metrics["events"]] == ["resume"]  # the spike belonged to the redone step 4


def test_resumed_run_logs_a_resume_marker(tiny_llama_dir, copy_task_file, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cut_run(tiny_llama_dir, copy_task_file, run, monkeypatch, stop_at=3)
    resume(tiny_llama_dir, copy_task_file, run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    markers = [r for r in rows if r.get("event") == "resume"]
    assert markers == [{"step": 3, "event": "resume", "from_step": 3, "checkpoint": "step-0000003"}]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_disk_full_during_a_checkpoint_is_one_message_and_keeps_the_last_good_one(tiny_llama_dir, copy_task_file,
                                                                                 tmp_path, monkeypatch):
    real = ckpt.save_file
    calls = {"n": 0}

    def fills_the_disk(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-4 checkpoint
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", fills_the_disk)
    run = tmp_path / "run"
    with pytest.raises(ckpt.CheckpointWriteError) as failed:
        train(tiny_recipe(tiny_llama_dir, copy_task_file, run, **sections()), progress=False)
    message = str(failed.value)
    assert "No space left on device" in message and "step-0000004" in message and "state.safetensors" in message
    assert "step-0000002" in message and "\n" not in message
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step-0000002"]  # no half-written folder
    assert ckpt.find_checkpoint(run, "auto").name == "step-0000002"
    assert ckpt.checkpoint_problem(root / "step-0000002") is None


def test_disk_full_while_writing_the_result_keeps_the_previous_one(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"previous")

    def write(into):
        (into / "adapter_config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device", str(into / "adapter_model.safetensors"))

    with pytest.raises(ckpt.CheckpointWriteError, match="adapter_model.safetensors: No space left on device"):
        ckpt.write_folder(folder, write, intact=tmp_path / "checkpoints" / "step-0000006")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert [p.name for p in folder.iterdir()] == ["adapter_model.safetensors"]
    assert (folder / "adapter_model.safetensors").read_bytes() == b"previous"
