"""bench/_deftune_step.host_launch_ms: the host's launch time per phase of the timed steps."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from _deftune_step import host_launch_ms


def test_host_launch_time_is_the_median_per_phase_after_the_warm_up():
    # The first (warm-up) sample is huge and must not count; medians are per phase and of the sums.
    samples = [(1.0, 1.0, 1.0), (0.001, 0.002, 0.003), (0.002, 0.004, 0.001), (0.003, 0.001, 0.002)]
    assert host_launch_ms(samples, skip=1) == {"forward": 2.0, "backward": 2.0, "optimizer": 2.0, "total": 6.0}
    assert host_launch_ms(samples[:1], skip=1) == {}
