"""bench/_bench_common.idle_gaps: idle time of the compute stream, split into host-late and waiting gaps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from _bench_common import idle_gaps

US = 1000  # ns


def test_gaps_are_split_by_when_the_work_after_them_was_launched():
    # Stream 7 (compute): k1 [0, 100us], k2 [150, 300] launched at 120us (after k1 ended: host late, 50us),
    # k3 [400, 500] launched at 10us (queued long before: waiting, 100us), k4 [505, 600] (5us gap: ignored).
    # Stream 9 (a copy) is less busy and is not the one measured.
    acts = [("k1", 7, 0, 100 * US, 1), ("k2", 7, 150 * US, 300 * US, 2), ("k3", 7, 400 * US, 500 * US, 3),
            ("k4", 7, 505 * US, 600 * US, 4), ("copy", 9, 0, 50 * US, 5)]
    launches = {1: 0, 2: 120 * US, 3: 10 * US, 4: 20 * US}
    out = idle_gaps(acts, launches, n=1)
    assert out["stream"] == 7
    assert out["span_ms_per_step"] == pytest.approx(0.6)
    assert out["busy_ms_per_step"] == pytest.approx(0.445)
    assert out["idle_ms_per_step"] == pytest.approx(0.155)
    assert out["idle_host_late_ms_per_step"] == pytest.approx(0.05)
    assert out["idle_waiting_ms_per_step"] == pytest.approx(0.1)
    assert [(g["before"], g["after"], g["host_late"]) for g in out["largest_gaps"]] == [
        ("k2", "k3", False), ("k1", "k2", True)]


def test_per_step_figures_divide_by_the_step_count_and_empty_input_gives_nothing():
    acts = [("a", 1, 0, 100 * US, 1), ("b", 1, 200 * US, 300 * US, 2)]
    out = idle_gaps(acts, {2: 150 * US}, n=2)
    assert out["idle_host_late_ms_per_step"] == pytest.approx(0.05)
    assert out["gaps_over_min_per_step"] == 0.5
    assert idle_gaps([], {}, n=1) == {}


def test_a_gap_whose_launch_was_not_recorded_is_unknown_not_waiting():
    # k2's launching call is missing from the trace: its 100us gap must not be read as a GPU-side wait.
    acts = [("k1", 3, 0, 100 * US, 1), ("k2", 3, 200 * US, 300 * US, 2)]
    out = idle_gaps(acts, {1: 0}, n=1)
    assert out["idle_launch_unknown_ms_per_step"] == pytest.approx(0.1)
    assert out["idle_waiting_ms_per_step"] == 0
    assert out["idle_host_late_ms_per_step"] == 0
    assert out["largest_gaps"][0]["host_late"] is None
