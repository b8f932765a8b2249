"""The public Python API works as a notebook or a sweep uses it: each call more than once per process."""

from __future__ import annotations

from conftest import tiny_recipe

import deftune


def test_every_public_function_works_twice_in_one_process(tiny_llama_dir, copy_task_file, tmp_path):
    runs = []
    for i in range(2):
        recipe = tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / f"run{i}", train={"max_steps": 2})
        runs.append(deftune.train(recipe, progress=False))
        assert callable(deftune.train)  # no subpackage import rebinds the public name
    assert [r.steps for r in runs] == [2, 2]
    for _ in range(2):
        metrics = deftune.evaluate(runs[0].run_dir, str(copy_task_file), device="cpu")
        assert metrics["records"] == 48 and metrics["eval_loss"] > 0
    answers = [deftune.generate(runs[0].run_dir, "copy: a b c", max_new_tokens=4, device="cpu") for _ in range(2)]
    assert answers[0] == answers[1]  # greedy
    for i in range(2):
        out = deftune.merge(runs[i].run_dir, str(tmp_path / f"merged{i}"))
        assert (out / "config.json").is_file()
    for name in ("train", "evaluate", "generate", "merge"):
        assert callable(getattr(deftune, name))
