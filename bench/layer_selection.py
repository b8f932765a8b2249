"""Training step time: LoRA all-linear on all layers vs only the top N layers of the default model.

    .venv/bin/python bench/layer_selection.py [--steps 6] [--top 4] [--out bench/results/layer_selection.json]

SmolLM2-135M-Instruct (the default model, 30 layers), demo data, LoRA r=16 alpha=32 on q,k,v,o,gate,up,down,
micro-batch 8 x accumulation 2, fp32 on CPU (bf16 autocast on CUDA). Both configurations load a fresh model
with the same seed and train on the same micro-batches; the first step is warm-up and not timed, the figure
is the median wall time of the next ``--steps`` optimizer steps. Adapters only on the top layers skip
backward through the frozen layers below (nothing there requires grad), so the step costs roughly one
forward of the whole stack plus forward + backward of the top N layers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def step_times(layers: str, steps: int, threads: int) -> dict:
    from deftune.config import recipe_from_dict
    from deftune.data import prepare_data
    from deftune.data.tokenize import ensure_pad_token
    from deftune.models.load import load_model, resolve_device
    from deftune.recipes.sft import count_params, prepare_model
    from deftune.training.loop import Trainer, seed_everything

    out = tempfile.mkdtemp(prefix="deftune-layer-bench-")
    recipe = recipe_from_dict({
        "output_dir": out, "data": {"train": "demo", "eval": "demo-eval", "max_length": 128,
                                    "max_eval_records": 8},
        "adapter": {"targets": "all-linear", "layers": layers, "rank": 16, "alpha": 32},
        "train": {"micro_batch": 8, "grad_accum": 2, "max_steps": steps + 1, "lr": 2e-4, "threads": threads},
        "eval": {"samples": 0}, "monitor": {"tensorboard": False, "report": False, "heatmap_every": 0,
                                            "layer_grad_norms": False, "guard": "off"},
    })
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(recipe.device)
    seed_everything(recipe.train.seed)
    model, tokenizer, _ = load_model(recipe.model, device)
    ensure_pad_token(tokenizer)
    data = prepare_data(recipe.data, tokenizer)
    seed_everything(recipe.train.seed)
    prepare_model(recipe, model, device)
    trainable, _ = count_params(model)
    trainer = Trainer(recipe, model, tokenizer, data, Path(out), device, progress=False)
    model.train()
    times, losses = [], []
    for _ in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        record = trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(record["loss"])
    return {"layers": layers, "trainable_params": trainable,
            "median_step_s": round(statistics.median(times[1:]), 3),
            "step_s": [round(t, 3) for t in times], "first_loss": round(losses[0], 5), "device": str(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per configuration")
    parser.add_argument("--top", type=int, default=4, help="N of the top:N configuration")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "layer_selection.json"))
    args = parser.parse_args()

    all_layers = step_times("all", args.steps, args.threads)
    top = step_times(f"top:{args.top}", args.steps, args.threads)
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "python": sys.version.split()[0], "torch": torch.__version__,
        "model": "default (SmolLM2-135M-Instruct, 30 layers)", "batch": "8 x 2", "timed_steps": args.steps,
        "all_layers": all_layers, f"top_{args.top}": top,
        "speedup": round(all_layers["median_step_s"] / top["median_step_s"], 2),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"{'adapter.layers':<16}{'trainable':>12}{'median step (s)':>18}")
    for row in (all_layers, top):
        print(f"{row['layers']:<16}{row['trainable_params']:>12,}{row['median_step_s']:>18.3f}")
    print(f"speed-up of top:{args.top} over all: x{result['speedup']}  ({result['machine']['processor']}, "
          f"torch {torch.__version__}, {args.steps} timed steps each)  -> {args.out}")


if __name__ == "__main__":
    main()
