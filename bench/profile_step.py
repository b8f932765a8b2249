"""Where a training step's GPU time goes: torch.profiler over deftune's fast path on a Llama shape.

    PYTHONPATH=$PWD/src python bench/profile_step.py --shape llama-1b --bs 8 \
        --out bench/results/profile_llama-1b.json

Same workload as bench/gpu_peers.py's "deftune fast" row (model.fast + train.offload_activations, LoRA
r=16 all-linear, seq 2048); 3 warm-up steps, then 2 profiled steps. Writes the top CUDA kernels by total
time, grouped by kernel name, with their share of the profiled GPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import make_model_folder, versions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--out", default="bench/results/profile_llama-1b.json")
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    from deftune.api import prepare_model
    from deftune.config import load_recipe
    from deftune.models.load import load_model
    from deftune.train.loss import response_loss_sum

    folder = tempfile.mkdtemp(prefix="profile_")
    make_model_folder(args.shape, folder)
    recipe = load_recipe(
        None,
        [
            f"model={folder}",
            "device=cuda",
            "model.attn_implementation=sdpa",
            "adapter.targets=all-linear",
            "adapter.rank=16",
            "adapter.alpha=16",
            "adapter.dropout=0",
            "model.fast=true",
            "train.offload_activations=true",
        ],
    )
    device = torch.device("cuda")
    model, _, _ = load_model(recipe.model, device)
    prepare_model(recipe, model, device)
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    vocab = model.config.vocab_size

    def step():
        x = torch.randint(0, vocab, (args.bs, args.seq), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_sum, n = response_loss_sum(model, {"input_ids": x, "labels": x})
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 2
    rows = []
    for evt in prof.key_averages():
        dev_t = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if dev_t > 0:
            rows.append((evt.key, dev_t / 2 / 1e3, evt.count // 2))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    top = [
        {"kernel": k[:160], "ms_per_step": round(ms, 3), "share": round(ms / total, 4), "calls_per_step": c}
        for k, ms, c in rows[: args.top]
    ]
    result = {
        "benchmark": "profile_step: GPU time by kernel, deftune fast + offload",
        "date": time.strftime("%Y-%m-%d"),
        "card": torch.cuda.get_device_name(0),
        "versions": versions(),
        "shape": args.shape,
        "bs": args.bs,
        "seq": args.seq,
        "wall_ms_per_step": round(wall * 1e3, 1),
        "gpu_ms_per_step": round(total, 1),
        "top": top,
    }
    out = Path(os.environ["OUT"]) / Path(args.out).name if os.environ.get("OUT") else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wall {wall * 1e3:.1f} ms/step, GPU busy {total:.1f} ms/step")
    for r in top:
        print(
            f"{r['ms_per_step']:9.3f} ms {100 * r['share']:5.1f}% x{r['calls_per_step']:<5d} "
            f"{r['kernel'][:110]}"
        )


if __name__ == "__main__":
    main()
