"""bench/train_e2e.py: its bookkeeping (row plan, round order, timing from step records, ratios, variant
parsing, full-length records) and its CPU smoke run end to end."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def e2e():
    sys.path.insert(0, str(BENCH))
    yield _load("train_e2e")
    sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def row_module(e2e):
    sys.path.insert(0, str(BENCH))
    yield _load("_deftune_train_row")
    sys.path.remove(str(BENCH))


def test_variants_parse_into_labelled_key_lists(e2e):
    got = e2e.parse_variants("fast:model.fast=true,train.offload_activations=true; preset:train.memory=auto;")
    assert got == [("fast", ["model.fast=true", "train.offload_activations=true"]),
                   ("preset", ["train.memory=auto"])]
    assert e2e.parse_variants("") == []


def test_plan_puts_the_compared_rows_first_and_adds_variants_at_each_precision(e2e):
    plan = e2e.row_plan([16, 4], [("fast", ["model.fast=true"])])
    names = [s["name"] for s in plan]
    assert names == ["deftune defaults", "unsloth sft", "deftune fast", "unsloth step", "hf+peft",
                     "deftune defaults 4bit", "unsloth sft 4bit", "deftune fast 4bit", "unsloth step 4bit",
                     "hf+peft 4bit"]
    by_name = {s["name"]: s for s in plan}
    assert by_name["deftune fast 4bit"]["sets"] == ["model.fast=true"]
    assert "--load4bit" in by_name["unsloth sft 4bit"]["cmd"] and "--bnb4" in by_name["hf+peft 4bit"]["cmd"]
    assert [s["name"] for s in e2e.row_plan([16], [])] == names[:2] + names[3:5]


def test_every_other_round_runs_in_reverse(e2e):
    specs = [{"name": n} for n in "abc"]
    order = [(k, s["name"]) for k, s in e2e.schedule(specs, 3)]
    assert order == [(1, "a"), (1, "b"), (1, "c"), (2, "c"), (2, "b"), (2, "a"), (3, "a"), (3, "b"), (3, "c")]


def _metrics_file(path: Path) -> list[dict]:
    """A metrics.jsonl as deftune writes it: steps, an event without timing, a skipped step."""
    lines = [
        {"step": 1, "loss": 2.0, "tokens": 100, "tokens_per_s": 10.0, "elapsed_s": 10.0},  # compile
        {"step": 1, "epoch": 0, "event": "augmented", "replaced": 1},
        {"step": 2, "loss": 1.9, "tokens": 100, "tokens_per_s": 100.0, "elapsed_s": 11.0},
        {"step": 3, "loss": 1.8, "tokens": 100, "tokens_per_s": 50.0, "elapsed_s": 13.0},
        {"step": 4, "loss": 1.7, "tokens": 120, "tokens_per_s": 60.0, "elapsed_s": 15.0},
        {"step": 5, "skipped": True, "tokens": 100, "loss": float("nan")},
    ]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_tokens_per_second_counts_the_steps_after_warmup_over_their_wall_time(e2e, tmp_path):
    records = _metrics_file(tmp_path / "metrics.jsonl")
    t = e2e.step_timing(records, warmup=2)
    assert t["status"] == "ok" and t["timed_steps"] == 2 and t["timed_tokens"] == 220
    assert t["tok_s"] == pytest.approx(220 / (15.0 - 11.0), abs=0.1)
    assert t["tok_s_median_step"] == pytest.approx(55.0)  # median of 50 and 60
    assert t["first_step_s"] == 10.0 and t["last_step"] == 4 and t["tokens_per_step"] == [100, 120]
    # No warm-up: the window starts at the start of training.
    assert e2e.step_timing(records, warmup=0)["tok_s"] == pytest.approx(420 / 15.0, abs=0.1)
    # Step times (the Unsloth callback's) win over logged tokens/s.
    clocked = [{"step": k, "tokens": 10, "elapsed_s": float(k), "step_s": 0.5} for k in (1, 2, 3)]
    assert e2e.step_timing(clocked, warmup=1)["tok_s_median_step"] == 20.0


def test_timing_says_when_no_step_follows_the_warmup(e2e):
    records = [{"step": 1, "tokens": 10, "elapsed_s": 1.0}]
    assert e2e.step_timing(records, warmup=1)["status"].startswith("error")
    assert e2e.step_timing([], warmup=1)["status"].startswith("error")


def _row(name, tok_s, round_no, status="ok", role="deftune", precision=16, reserved=4.0):
    return {"name": name, "precision": precision, "role": role, "round": round_no, "status": status,
            "tok_s": tok_s, "peak_reserved_gib": reserved, "peak_alloc_gib": reserved - 1}


def test_ratios_are_per_round_against_unsloth_sft_with_their_median(e2e):
    rows = [_row("deftune defaults", 130.0, 1, reserved=3.0), _row("unsloth sft", 100.0, 1, role="peer"),
            _row("unsloth sft", 110.0, 2, role="peer", reserved=4.5), _row("deftune defaults", 121.0, 2),
            _row("deftune defaults", 150.0, 3), _row("unsloth sft", 100.0, 3, role="peer"),
            _row("deftune slow", None, 1, status="error")]
    r = e2e.ratios(rows, [16])
    d = r["deftune defaults"]
    assert d["round_ratios"] == [1.3, 1.1, 1.5] and d["ratio_median"] == 1.3
    assert d["ratio_of_medians"] == pytest.approx(130.0 / 100.0, abs=1e-3)
    assert d["reserved_gib"] == 4.0 and d["peer_reserved_gib"] == 4.5  # largest over rounds
    assert d["met"] is True and d["floor_1_15x"] is True
    assert r["deftune slow"]["met"] is None and "error" in r["deftune slow"]["why"]
    merged = {m["name"]: m for m in e2e.aggregate(rows)}
    assert merged["deftune defaults"]["tok_s"] == 130.0 and merged["deftune defaults"]["rounds_ok"] == 3


def test_ratio_is_undecided_while_the_peer_is_skipped(e2e):
    rows = [_row("deftune defaults", 100.0, 1),
            _row("unsloth sft", None, 1, status="skipped: no CUDA", role="peer")]
    assert e2e.ratios(rows, [16])["deftune defaults"]["met"] is None


def test_records_are_fitted_to_the_exact_length(row_module):
    # A tokenizer with one token per word plus 7 template tokens (EOS included).
    def count(record):
        return len(record["instruction"].split()) + len(record["output"].split()) + 7

    for seq in (64, 100, 2048):
        record, length = row_module.fit_record(count, seq, random.Random(0))
        assert length == seq == count(record)
        assert set(record) == {"instruction", "output"}


def test_workload_sets_only_its_keys(row_module):
    keys = row_module.workload_overrides("/m", "/d.jsonl", "/o", 8, 2048, 11, 4, "cuda")
    names = [k.split("=", 1)[0] for k in keys]
    assert "model.quantize=nf4" in keys and "train.max_steps=11" in keys and "device" not in names
    speed_keys = ("model.fast", "train.offload", "train.gradient_checkpointing", "train.memory")
    assert not any(n.startswith(speed_keys) for n in names)
    assert "device=cpu" in row_module.workload_overrides("/m", "/d", "/o", 2, 64, 4, 16, "cpu")


def test_cpu_smoke_run_writes_the_result_json(tmp_path):
    out = tmp_path / "train_e2e_tiny.json"
    proc = subprocess.run([sys.executable, str(BENCH / "train_e2e.py"), "--shape", "tiny", "--device", "cpu",
                           "--rounds", "1", "--out", str(out)], capture_output=True, text=True, timeout=300,
                          cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["status"] == "done"
    assert {"versions", "src_digest", "card", "date", "command", "workload", "rows", "summary",
            "ratios"} <= set(result)
    rows = {r["name"]: r for r in result["rows"]}
    for name in ("deftune defaults", "deftune defaults 4bit"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["tok_s"] > 0 and row["tok_s_median_step"] > 0 and row["timed_steps"] == 3
        assert row["host_rss_peak_gib"] > 0 and "host_rss_gib" in row
        assert "peak_alloc_gib" in row and "peak_reserved_gib" in row  # None on a CPU
        assert row["tokens_per_step"][-1] == 2 * 64  # full-length records: bs x seq
    for name in ("unsloth sft", "unsloth step", "hf+peft"):
        assert rows[name]["status"] == rows[f"{name} 4bit"]["status"] == "skipped: no CUDA"
    assert result["model_folder"]["exact"] is True
    lines = proc.stdout.splitlines()
    head = max(i for i, ln in enumerate(lines) if ln.startswith("row "))
    assert len(lines) - head - 2 == len(result["summary"]) == 8  # the table comes last, one line a row
