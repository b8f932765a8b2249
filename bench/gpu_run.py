"""One GPU run of the demo recipe: a random-init model of SmolLM2-135M's shape (the embedded GGUF is too
large to send to the GPU host), bf16, same data and settings as `make demo`.

    python bench/gpu_run.py --shape-dir DIR --out bench/results/gpu_demo_run.json [--steps 60]

DIR holds SmolLM2-135M-Instruct's config.json and tokenizer files (copied from the GGUF cache).
Records the card, versions, tokens/s, peak memory and eval loss before/after.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import deftune
    from deftune.config import load_recipe

    work = Path(tempfile.mkdtemp(prefix="gpu-run-"))
    config = AutoConfig.from_pretrained(args.shape_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(work / "model", safe_serialization=True)
    AutoTokenizer.from_pretrained(args.shape_dir).save_pretrained(work / "model")
    del model
    recipe = load_recipe(None, [f"model={work / 'model'}", f"output_dir={work / 'run'}", "device=cuda",
                                f"train.max_steps={args.steps}", "eval.samples=48", "eval.final_samples=48",
                                "eval.metrics=[exact_match]", "train.save_every=0",
                                "eval.every=0", "monitor.tensorboard=false", "monitor.report=false"])
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    summary = deftune.train(recipe, progress=False)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    timed = steps[1:]
    tokens_per_s = sum(r["tokens"] for r in timed) / (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"])
    result = {
        "benchmark": "gpu_demo_run: demo recipe (LoRA r16 all-linear, batch 8x2, demo data) on a random-init "
                     "SmolLM2-135M-shaped model, bf16",
        "date": time.strftime("%Y-%m-%d"),
        "card": torch.cuda.get_device_name(0),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "deftune": deftune.__version__},
        "steps": summary.steps,
        "tokens_per_s": round(tokens_per_s, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "eval_loss_before": summary.before.get("eval_loss"),
        "eval_loss_after": summary.after.get("eval_loss"),
        "exact_match_before": summary.before.get("exact_match"),
        "exact_match_after": summary.after.get("exact_match"),
        "first_loss": steps[0]["loss"],
        "last_loss": steps[-1]["loss"],
        "wall_s_including_load_and_eval": round(wall, 1),
        "command": f"python bench/gpu_run.py --shape-dir DIR --out OUT --steps {args.steps}",
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
