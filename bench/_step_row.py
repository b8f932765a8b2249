"""Run a bare-step runner (bench/_unsloth_step.py, bench/_hf_step.py) in this process and add what
bench/train_e2e.py reports for every row: reserved GPU memory and host RSS, read after the runner returns.

    python bench/_step_row.py _unsloth_step.py --model-dir /tmp/m1b --shape llama-1b --bs 8 --seq 2048 \\
        [--load4bit]

The runner's own ``BENCH_JSON`` line is caught and printed again with the fields added (its ``peak_gib``,
read right after its timed steps, becomes ``peak_alloc_gib``); ``--warmup`` is passed through.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _bench_common import Tee, emit, host_rss_gib, max_rss_gib, parse_result  # noqa: E402


def main() -> None:
    runner, args = sys.argv[1], sys.argv[2:]
    tee = Tee(sys.stdout)
    sys.argv = [os.path.join(HERE, runner), *args]
    error = None
    try:
        with contextlib.redirect_stdout(tee):
            runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exc:  # argparse errors and explicit exits
        if exc.code not in (0, None):
            error = f"{runner} exited with {exc.code}"
    except Exception as exc:  # noqa: BLE001 - a runner failure is the row's result
        error = f"{type(exc).__name__}: {exc}"[:500] + "\n" + traceback.format_exc()[-1200:]
    row = parse_result("".join(tee.kept))
    if row is None:
        row = {"status": "error", "error": error or f"{runner}: no result line"}
    if error and row.get("status") == "ok":
        row["after_error"] = error
    if "peak_gib" in row:
        row["peak_alloc_gib"] = row.pop("peak_gib")
    row["host_rss_peak_gib"] = round(max_rss_gib(), 3)
    row["host_rss_gib"] = round(host_rss_gib(), 3)
    row["tok_s_is"] = "median step (bare step on random tokens)"
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
            row.setdefault("peak_alloc_gib", round(torch.cuda.max_memory_allocated() / 2**30, 3))
    except Exception:  # noqa: BLE001 - memory is extra information
        pass
    row["tok_s_median_step"] = row.get("tok_s")
    emit(row)


if __name__ == "__main__":
    main()
