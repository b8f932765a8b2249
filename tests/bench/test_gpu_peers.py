"""bench/gpu_peers.py's bookkeeping: round order, per-name aggregation and the issue-6 targets."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def peers():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("gpu_peers", BENCH / "gpu_peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(BENCH))


def _row(name, tok_s, peak, round_no=1, status="ok", **flags):
    return {"name": name, "precision": 16, "tok_s": tok_s, "peak_gib": peak, "status": status,
            "round": round_no, **flags}


def test_every_other_round_runs_in_reverse(peers):
    specs = [{"name": n} for n in "abc"]
    order = [(k, s["name"]) for k, s in peers.schedule(specs, 3)]
    assert order == [(1, "a"), (1, "b"), (1, "c"), (2, "c"), (2, "b"), (2, "a"), (3, "a"), (3, "b"), (3, "c")]


def test_targets_use_the_median_over_rounds_and_the_largest_peak(peers):
    rows = [
        _row("deftune fast", 120.0, 3.0, 1, primary=True), _row("unsloth", 100.0, 4.0, 1, peer=True),
        _row("unsloth", 110.0, 4.0, 2, peer=True), _row("deftune fast", 118.0, 3.2, 2, primary=True),
        _row("deftune fast", 130.0, 3.1, 3, primary=True), _row("unsloth", 90.0, 4.0, 3, peer=True),
    ]
    t = peers.compute_targets(rows, [16])["16-bit"]
    assert t["speed_ratio"] == pytest.approx(120.0 / 100.0, abs=1e-3)  # medians 120 and 100
    assert t["deftune_peak_gib"] == 3.2 and t["met"] is True
    assert t["round_ratios"] == [1.2, round(118 / 110, 3), round(130 / 90, 3)]
    assert t["tok_s_is"] == "median over rounds"


def test_a_failed_round_is_left_out_and_a_single_round_is_reported_as_before(peers):
    rows = [_row("deftune fast", 100.0, 3.0, 1, primary=True), _row("unsloth", 100.0, 4.0, 1, peer=True),
            _row("deftune fast", None, None, 2, status="timeout", primary=True)]
    merged = {r["name"]: r for r in peers.aggregate(rows)}
    assert merged["deftune fast"]["tok_s"] == 100.0
    assert merged["deftune fast"]["rounds_tok_s"] == [100.0, None]
    t = peers.compute_targets(rows, [16])["16-bit"]
    assert t["met"] is False and t["speed_ratio"] == 1.0
    single = [{k: v for k, v in r.items() if k != "round"} for r in rows[:2]]
    t1 = peers.compute_targets(single, [16])["16-bit"]
    assert "round_ratios" not in t1 and t1["speed_ratio"] == 1.0


def test_variants_start_from_the_primary_recipe_of_their_precision(peers):
    plan = peers.row_plan([16, 4], True, ("train.checkpoint_skip=2",),
                          tuple(peers.parse_variants("lb:env:CUDA_LAUNCH_BLOCKING=1;sk1:train.checkpoint_skip=1")),
                          ("train.reuse_dequantized=true",))
    rows = {r["name"]: r for r in plan}
    lb16, lb4, sk1 = rows["deftune fast lb"], rows["deftune fast nf4 lb"], rows["deftune fast nf4 sk1"]
    assert lb16["env"] == {"CUDA_LAUNCH_BLOCKING": "1"}
    assert "train.checkpoint_skip=2" in lb16["cmd"] and "train.reuse_dequantized=true" not in lb16["cmd"]
    assert lb4["cmd"][-4:] == ["--set", "train.checkpoint_skip=2", "--set", "train.reuse_dequantized=true"]
    # The variant's own override comes last (the runner applies --set in order: the last one wins).
    assert sk1["cmd"][-2:] == ["--set", "train.checkpoint_skip=1"]
    assert [r["name"] for r in plan][:4] == ["deftune fast", "deftune fast lb", "deftune fast sk1", "unsloth"]


def test_results_have_stable_names_per_shape_precision_and_experiment(peers):
    assert peers.result_name("llama-8b", [16, 4]) == "gpu_peers_llama-8b.json"
    assert peers.result_name("llama-1b", [16]) == "gpu_peers_llama-1b_16bit.json"
    assert peers.result_name("llama-1b", [4]) == "gpu_peers_llama-1b_4bit.json"
    assert peers.result_name("llama-1b", [16, 4], "hostlaunch") == "gpu_peers_llama-1b_hostlaunch.json"
