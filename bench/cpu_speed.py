"""CPU training speed: deftune vs plain transformers + PEFT on the same model, data and settings.

    .venv/bin/python bench/cpu_speed.py [--steps 12] [--out bench/results/cpu_speed.json]

Both train LoRA r=16 alpha=32 on q,k,v,o,gate,up,down of SmolLM2-135M-Instruct (the cached fp32
safetensors copy of the embedded GGUF) on the demo data with the seed template, micro-batch 8 x accumulation
2, fp32, torch threads = 2, one after the other in fresh processes (so neither warms the other's caches).
tokens/s = non-pad tokens of the timed optimizer steps / their wall time; the first step is warm-up and not
timed. Writes a JSON with both figures, the ratio, versions and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cached_default_model() -> str:
    from deftune.config import ModelConfig
    from deftune.models.load import _materialise_gguf, resolve_model

    cfg = ModelConfig()
    return str(_materialise_gguf(resolve_model(cfg.path), cfg))


def run_deftune(model_dir: str, steps: int, threads: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="deftune-bench-"))
    args = [
        sys.executable, "-m", "deftune.cli", "train", "--no-progress", f"model={model_dir}",
        f"output_dir={out}/run", f"train.max_steps={steps}", "eval.every=0", "train.save_every=0",
        f"train.threads={threads}", "eval.samples=0", "data.eval=demo-eval", "data.max_eval_records=8",
        "adapter.rank=16", "adapter.alpha=32", "adapter.targets=all-linear", "adapter.layers=all",
        "train.micro_batch=8", "train.grad_accum=2", "train.lr=2e-4",
    ]
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "loss" in r]
    timed = steps_rows[1:]
    tokens = sum(r["tokens"] for r in timed)
    seconds = steps_rows[-1]["elapsed_s"] - steps_rows[0]["elapsed_s"]
    return {"tokens_per_s": round(tokens / seconds, 1), "timed_steps": len(timed), "tokens": tokens,
            "seconds": round(seconds, 2), "final_loss": steps_rows[-1]["loss"]}


def run_peft(model_dir: str, steps: int, threads: int) -> dict:
    args = [sys.executable, str(ROOT / "bench" / "cpu_peft_baseline.py"), "--model", model_dir,
            "--steps", str(steps), "--threads", str(threads), "--lr", "2e-4"]
    out = subprocess.run(args, check=True, cwd=ROOT, capture_output=True, text=True).stdout
    line = [x for x in out.splitlines() if x.startswith("{")][-1]
    return json.loads(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu_speed.json"))
    args = ap.parse_args()
    import peft
    import torch
    import transformers

    model_dir = cached_default_model()
    deftune_result = run_deftune(model_dir, args.steps, args.threads)
    peft_result = run_peft(model_dir, args.steps, args.threads)
    ratio = deftune_result["tokens_per_s"] / peft_result["tokens_per_s"]
    result = {
        "benchmark": "cpu_speed: LoRA r16 all-linear, SmolLM2-135M-Instruct fp32, demo data, batch 8x2",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": args.threads},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
        "steps": args.steps,
        "deftune": deftune_result,
        "hf_peft": peft_result,
        "speedup": round(ratio, 3),
        "command": "python bench/cpu_speed.py --steps %d" % args.steps,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"deftune {deftune_result['tokens_per_s']} tokens/s vs HF+PEFT {peft_result['tokens_per_s']} "
          f"tokens/s: {ratio:.2f}x")


if __name__ == "__main__":
    main()
