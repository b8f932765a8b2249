import importlib.util
import json
import math
import sys

import pytest

from deftune.errors import DeftuneError, MissingExtraError
from deftune.training.report import build_report, grad_norm_band, ineffective_modules, read_metrics

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="plots need the 'monitor' extra (matplotlib)"
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPIKE_STEP = 23
LAYERS = [0, 1, 2]
MODULES = ["q_proj", "v_proj", "down_proj"]
# One planted ineffective cell: layer 1 down_proj moves ~1000x less than the others.
HEATMAP_VALUES = [[0.012, 0.011, 0.013], [0.010, 0.014, 1.0e-5], [0.015, None, 0.012]]


def _train_records(n: int = 40) -> list[dict]:
    rows = []
    for step in range(1, n + 1):
        grad = 1.0 + 0.05 * math.sin(step) + (9.0 if step == SPIKE_STEP else 0.0)
        rows.append({
            "step": step, "epoch": step / n, "loss": 2.0 / step + 0.5, "lr": 1e-3 * (1 - step / (n + 1)),
            "grad_norm": grad, "tokens": 512 * step, "tokens_per_s": 1000.0 + step, "elapsed_s": 0.5 * step,
            "peak_mem_gib": 1.25, "some_future_key": "ignored",
        })
    return rows


def _all_kinds() -> list[dict]:
    rows = _train_records()
    rows += [
        {"step": 0, "event": "augmented", "epoch": 0, "replaced": 3, "total": 20},
        {"step": 20, "eval_loss": 1.2, "eval_ppl": 3.32, "exact_match": 0.25, "token_f1": 0.5, "bleu4": 0.3,
         "rougeL": 0.45, "bleu_tokenizer": "13a", "rouge_tokenizer": "whitespace", "samples": 8},
        {"step": 40, "eval_loss": 0.9, "eval_ppl": 2.46, "exact_match": 0.625, "token_f1": 0.8, "bleu4": 0.6,
         "rougeL": 0.7, "bleu_tokenizer": "13a", "rouge_tokenizer": "whitespace", "samples": 8},
        {"step": SPIKE_STEP, "event": "grad_spike", "grad_norm": 10.0, "mean": 1.0, "std": 0.04, "z": 225.0,
         "action": "skip"},
        {"step": 31, "event": "nonfinite", "what": "loss", "action": "skip"},
        {"step": 30, "event": "lr_reduced", "metric": "eval_loss", "factor": 0.5, "lr_scale": 0.5},
        {"step": 40, "event": "early_stop", "metric": "eval_loss"},
        {"step": 20, "event": "best", "metric": "eval_loss", "value": 1.2},
        {"step": 40, "event": "best", "metric": "eval_loss", "value": 0.9},
        {"step": 40, "event": "update_heatmap", "layers": LAYERS, "modules": MODULES,
         "values": HEATMAP_VALUES},
    ]
    rows += [{"step": s, "event": "guard_band", "mean": 1.0, "std": 0.05, "k": 3.0} for s in range(10, 41)]
    return rows


def _write_run(run_dir, rows, tail: str = "", summary: dict | None = None):
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + tail
    (run_dir / "metrics.jsonl").write_text(text, encoding="utf-8")
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return run_dir


SUMMARY = {
    "run_dir": "x", "method": "lora", "steps": 40, "seconds": 20.0, "tokens_per_s": 1020.5,
    "trainable_params": 12345, "total_params": 1234500,
    "before": {"eval_loss": 2.5, "exact_match": 0.125}, "after": {"eval_loss": 0.875, "exact_match": 0.625},
}


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


@needs_matplotlib
def test_full_report_has_plots_events_and_ineffective_modules(tmp_path):
    run = _write_run(tmp_path / "run", _all_kinds(), tail='{"step": 41, "loss": 0.4', summary=SUMMARY)
    report = build_report(run)
    assert report == run / "report.md"
    for name in ("loss", "lr", "grad_norm", "validation", "update_heatmap"):
        assert _is_png(run / "plots" / f"{name}.png"), name
        assert f"(plots/{name}.png)" in report.read_text()
    text = report.read_text()
    assert "Steps: 40" in text and "12,345" in text
    assert "| eval_loss | 2.5 | 0.875 | -1.625 |" in text
    assert "| exact_match | 0.125 | 0.625 | +0.5 |" in text
    assert "BLEU tokenizer: `13a`" in text and "ROUGE tokenizer: `whitespace`" in text
    assert f"Gradient spikes: step {SPIKE_STEP}" in text
    assert f"Skipped steps (2): {SPIKE_STEP}, 31" in text
    assert "LR reductions: step 30" in text and "Early stop at step 40" in text
    assert "Best checkpoint: step 40, eval_loss = 0.9" in text
    assert "epoch 0: 3 of 20" in text
    assert "cut short" in text  # the truncated last line is noted, not fatal
    ineffective = text.split("## Ineffective modules")[1].split("##")[0]
    assert "| 1 | `down_proj` |" in ineffective
    assert "q_proj" not in ineffective and "v_proj" not in ineffective


def test_read_metrics_sorts_kinds_and_skips_truncated_last_line(tmp_path):
    run = _write_run(tmp_path / "run", _all_kinds(), tail='{"step": 41, "lo')
    m = read_metrics(run)
    assert len(m["train"]) == 40 and len(m["eval"]) == 2 and len(m["heatmap"]) == 1
    assert len(m["guard_band"]) == 31 and len(m["events"]) == 7
    assert m["truncated"] == [len(_all_kinds()) + 1]


def test_malformed_middle_line_names_file_and_line(tmp_path):
    rows = _train_records(5)
    lines = [json.dumps(r) for r in rows]
    lines[2] = lines[2][:15]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DeftuneError, match=r"metrics\.jsonl, line 3"):
        read_metrics(run)
    with pytest.raises(DeftuneError, match="line 3"):
        build_report(run)


@needs_matplotlib
def test_report_with_only_train_records(tmp_path):
    run = _write_run(tmp_path / "run", _train_records(12))
    text = build_report(run).read_text()
    for name in ("loss", "lr", "grad_norm"):
        assert _is_png(run / "plots" / f"{name}.png")
    assert not (run / "plots" / "validation.png").exists()
    assert not (run / "plots" / "update_heatmap.png").exists()
    assert "no validation plot" in text
    assert "No events were logged" in text and "No update heatmap was logged" in text
    assert "Steps: 12" in text


def test_ineffective_modules_threshold_is_fraction_of_median():
    record = {"layers": LAYERS, "modules": MODULES, "values": HEATMAP_VALUES}
    assert ineffective_modules(record) == [(1, "down_proj", 1.0e-5)]
    # median of the 8 present values is 0.012; at fraction 1 everything strictly below it is listed
    below = ineffective_modules(record, fraction=1.0)
    assert {(layer, module) for layer, module, _ in below} == {(0, "v_proj"), (1, "q_proj"), (1, "down_proj")}
    with pytest.raises(DeftuneError, match="3 rows"):
        ineffective_modules({"layers": LAYERS, "modules": MODULES, "values": HEATMAP_VALUES[:2]})


def test_grad_norm_band_uses_only_earlier_unflagged_steps():
    steps = list(range(1, 9))
    norms = [1.0, 1.0, 1.0, 1.0, 1.0, 50.0, 1.0, 1.0]
    band_steps, lower, upper = grad_norm_band(steps, norms, window=5, min_count=5)
    assert band_steps == [6, 7, 8]
    assert lower[0] == upper[0] == 1.0  # the spike at step 6 does not widen its own band
    assert upper[1] > 1.0 and lower[1] == 0.0  # it widens later ones; the band never goes below 0
    _, lower, upper = grad_norm_band(steps, norms, window=5, min_count=5, exclude={6})
    assert lower == upper == [1.0, 1.0, 1.0]  # a flagged spike stays out of the statistics


def test_missing_matplotlib_names_the_monitor_extra(tmp_path, monkeypatch):
    run = _write_run(tmp_path / "run", _train_records(3))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=r"deftune\[monitor\]"):
        build_report(run)
