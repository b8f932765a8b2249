"""Smarter adapters on the demo task (CPU): dynamic rank vs fixed rank 32, progressive vs all-at-once.

    .venv/bin/python bench/adapters_proof.py run fixed dynamic --seeds 1 2 3     # appends to the JSON
    .venv/bin/python bench/adapters_proof.py run allatonce progressive --seeds 1
    .venv/bin/python bench/adapters_proof.py summary                             # table + verdicts

Every run is `deftune train` on the demo recipe (SmolLM2-135M-Instruct, date normalisation, LoRA on all
linear layers, batch 8x2, lr 5e-4) with the overrides below; eval loss and exact match are measured on the
200 held-out records at the end; adapter parameters are counted from the saved adapter file.
Results: bench/results/adapters_proof.json (one entry per run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "adapters_proof.json"
STEPS = 48
COMMON = [f"train.max_steps={STEPS}", "train.save_every=0", "eval.samples=0", "eval.final_samples=200",
          "monitor.report=false", "monitor.tensorboard=false", "eval.metrics=[exact_match]"]
CONFIGS = {
    "fixed": ["adapter.rank=32", "adapter.alpha=64", "eval.every=0"],
    "dynamic": ["adapter.ranks=[8,16,32]", "adapter.alpha=64", "adapter.sensitivity=0.7", "eval.every=0"],
    # Loss-only validations every 4 steps on 100 held-out records: steps to the target eval loss.
    "allatonce": ["eval.every=4", "data.max_eval_records=100"],
    "progressive": ["eval.every=4", "data.max_eval_records=100",
                    "adapter.stages=[{targets: attention, steps: 16}, {targets: attention+mlp}]"],
}
TARGET_EVAL_LOSS = 0.1


def adapter_params(run: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        return sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())


def run_one(name: str, seed: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"proof-{name}-")) / "run"
    args = [sys.executable, "-m", "deftune.cli", "train", "--no-progress", f"output_dir={out}",
            f"train.seed={seed}", *COMMON, *CONFIGS[name]]
    t0 = time.perf_counter()
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r and "phase" not in r]
    reached = next((s for s, v in evals if v <= TARGET_EVAL_LOSS), None)
    ranks = [r for r in rows if r.get("event") == "rank_allocation"]
    return {
        "config": name, "seed": seed, "steps": summary["steps"], "wall_s": round(time.perf_counter() - t0, 1),
        "eval_loss": summary["after"].get("eval_loss"), "exact_match": summary["after"].get("exact_match"),
        "adapter_params": adapter_params(out), "eval_curve": evals,
        "steps_to_target": reached, "target_eval_loss": TARGET_EVAL_LOSS,
        "final_ranks": ranks[-1]["ranks"] if ranks else None,
        "overrides": CONFIGS[name],
    }


def summary() -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": []}
    by = {}
    for r in data["runs"]:
        by.setdefault(r["config"], []).append(r)

    def stat(rows, key):
        values = [r[key] for r in rows if r.get(key) is not None]
        if not values:
            return None, None
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    print(f"{'config':<12}{'runs':>5}{'eval loss':>20}{'exact match':>20}{'adapter params':>16}{'steps->target':>15}")
    table = {}
    for name, rows in by.items():
        loss, loss_sd = stat(rows, "eval_loss")
        em, em_sd = stat(rows, "exact_match")
        params, _ = stat(rows, "adapter_params")
        reach = [r["steps_to_target"] for r in rows]
        table[name] = {"eval_loss_mean": loss, "eval_loss_sd": loss_sd, "exact_match_mean": em,
                       "exact_match_sd": em_sd, "adapter_params_mean": params, "steps_to_target": reach}
        print(f"{name:<12}{len(rows):>5}{loss:>12.4f} ± {loss_sd:<6.4f}{em:>12.3f} ± {em_sd:<6.3f}"
              f"{params:>16,.0f}{str(reach):>15}")
    if "fixed" in table and "dynamic" in table:
        f, d = table["fixed"], table["dynamic"]
        ratio_loss = d["eval_loss_mean"] / f["eval_loss_mean"]
        ratio_params = d["adapter_params_mean"] / f["adapter_params_mean"]
        verdict = ratio_loss <= 1.02 and ratio_params <= 0.60
        print(f"dynamic/fixed: eval loss x{ratio_loss:.3f} (target <= 1.02), adapter params x{ratio_params:.3f} "
              f"(target <= 0.60): {'MET' if verdict else 'NOT MET'}")
        data["dynamic_vs_fixed"] = {"eval_loss_ratio": ratio_loss, "adapter_params_ratio": ratio_params,
                                    "target_met": verdict}
    data["table"] = table
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    r = sub.add_parser("run")
    r.add_argument("configs", nargs="+", choices=sorted(CONFIGS))
    r.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    sub.add_parser("summary")
    args = ap.parse_args()
    if args.verb == "summary":
        summary()
        return
    import platform

    import torch

    for name in args.configs:
        for seed in args.seeds:
            result = run_one(name, seed)
            data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": []}
            data.setdefault("machine", {"cpu": platform.machine(), "torch": torch.__version__, "threads": 2})
            data["date"] = time.strftime("%Y-%m-%d")
            data["runs"].append(result)
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(data, indent=1) + "\n")
            print(json.dumps({k: result[k] for k in ("config", "seed", "eval_loss", "exact_match",
                                                      "adapter_params", "steps_to_target", "wall_s")}), flush=True)


if __name__ == "__main__":
    main()
