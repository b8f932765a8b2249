"""MoE training speed and memory on one GPU: deftune expert-LoRA vs HF + PEFT on a DeepSeek-V2-Lite shape.

    PYTHONPATH=$PWD/src python bench/moe_gpu.py --anchor .gpu/anchor_moe.py --out bench/results/moe_gpu.json

Workload (as ../shared/bench/anchor_moe.py, the HF + PEFT side, run here as a subprocess on the same
card): a random-init DeepSeek-V2-Lite-shaped model (15.7B params, 27 layers, 64 routed + 2 shared experts,
top-6, MLA attention), bf16, SDPA, random tokens, seq 2048, batch 4, LoRA r=16 alpha=16 on the attention
projections, gradient checkpointing, fused AdamW + clip 1.0, 3 warm-up + 8 timed steps, median step.

deftune side: method expert-lora with experts.also=attention, i.e. the same attention LoRA plus LoRA
(r=16) on a seeded random ~10% of the routed experts of every MoE layer (6 of 64), built through
deftune's own library path (recipe -> experts.prepare -> gradient checkpointing -> train/loss.py's loss),
with model.fast on (fused RMSNorm, LoRA autograd and linear+CE) and off. Peak = max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def ds_v2_lite_config(tiny: bool = False):
    from transformers import DeepseekV2Config

    shape = dict(
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        num_attention_heads=16,
        num_key_value_heads=16,
    )
    if tiny:  # CPU smoke test of this script's own path
        shape = dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    return DeepseekV2Config(
        **shape,
        first_k_dense_replace=1,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        q_lora_rank=None,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def run_deftune(args) -> dict:
    from transformers import AutoModelForCausalLM

    from deftune.config import recipe_from_dict
    from deftune.recipes.sft import enable_checkpointing, prepare_model
    from deftune.training.loss import response_loss_sum

    cfg = ds_v2_lite_config(args.tiny)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(
            cfg, dtype=torch.bfloat16, attn_implementation="sdpa", experts_implementation="grouped_mm"
        )
    init_s = time.time() - t0
    n_exp = cfg.n_routed_experts
    k = max(1, round(args.expert_fraction * n_exp))
    rng = random.Random(0)
    # A seeded random pick stands in for a domain selection: with random weights routing is near uniform.
    selection = {
        layer: sorted(rng.sample(range(n_exp), k))
        for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers)
    }
    recipe = recipe_from_dict(
        {
            "method": "expert-lora",
            "device": dev,
            "model": {"fast": bool(args.fast)},
            "train": {"gradient_checkpointing": True, "checkpoint_skip": args.checkpoint_skip},
            "adapter": {"rank": args.rank, "alpha": args.rank, "dropout": 0.0},
            "experts": {"domains": {"bench": selection}, "select": "bench", "also": "attention"},
        }
    )
    device = torch.device(dev)
    prepare_model(recipe, model, device)
    enable_checkpointing(recipe, model)  # as api.train does
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev == "cuda")
    gen = torch.Generator(device=dev).manual_seed(1)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps + 3):
        x = torch.randint(0, cfg.vocab_size, (args.bs, args.seq), device=dev, generator=gen)
        batch = {"input_ids": x, "labels": x}
        sync()
        t = time.perf_counter()
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss_sum, n = response_loss_sum(model, batch)
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t)
        losses.append(round(float(loss_sum.detach()) / n, 4))
    step = statistics.median(times[3:])
    return dict(
        framework="deftune",
        method="expert-lora",
        fast=args.fast,
        checkpoint_skip=args.checkpoint_skip,
        expert_fraction=k / n_exp,
        experts_per_layer=k,
        also="attention",
        seq=args.seq,
        bs=args.bs,
        rank=args.rank,
        trainable_m=round(n_train / 1e6, 2),
        init_s=round(init_s, 1),
        step_s=round(step, 4),
        tok_s=round(args.bs * args.seq / step),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None,
        losses=losses,
    )


def run_child(cmd: list[str], timeout: int) -> dict:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "cmd": " ".join(cmd)}
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not rows:
        return {"status": f"failed rc={proc.returncode}", "cmd": " ".join(cmd), "stderr": proc.stderr[-3000:]}
    return {"status": "ok", **rows[-1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--anchor", default="", help="path to a copy of ../shared/bench/anchor_moe.py (HF + PEFT)"
    )
    ap.add_argument("--out", default="bench/results/moe_gpu.json")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--bs", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--expert-fraction", type=float, default=0.1)
    ap.add_argument("--fast", type=int, default=1)
    ap.add_argument(
        "--checkpoint-skip", type=int, default=0, help="train.checkpoint_skip (top layers not recomputed)"
    )
    ap.add_argument("--child", action="store_true", help="run one deftune configuration and print JSON")
    ap.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke test of the deftune path)")
    ap.add_argument("--configs", default="fast,plain,hf-attn,hf-all")
    ap.add_argument("--timeout", type=int, default=240)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_deftune(args)), flush=True)
        return
    if not torch.cuda.is_available():
        sys.exit("moe_gpu.py needs a CUDA GPU")
    import peft
    import transformers

    # The workload flags both sides take (the HF + PEFT anchor script reads the same names).
    shared = ["--seq", str(args.seq), "--bs", str(args.bs), "--rank", str(args.rank),
              "--steps", str(args.steps)]  # fmt: skip
    me = [sys.executable, __file__, "--child", *shared, "--checkpoint-skip", str(args.checkpoint_skip),
          "--expert-fraction", str(args.expert_fraction)]  # fmt: skip
    hf = [sys.executable, args.anchor, *shared]
    plan = {
        "fast": me + ["--fast", "1"],
        "plain": me + ["--fast", "0"],
        "hf-attn": hf + ["--no-expert-lora"],
        "hf-all": hf,
        "fast-all-experts": me + ["--expert-fraction", "1.0", "--fast", "1"],  # argparse: the last value wins
        # Spend the memory left under HF's attention-only peak on not recomputing the top layers.
        "fast-skip6": me + ["--fast", "1", "--checkpoint-skip", "6"],
    }
    rows = {}
    for name in args.configs.split(","):
        if name.startswith("hf") and not args.anchor:
            rows[name] = {"status": "skipped: no --anchor"}
            continue
        t0 = time.time()
        rows[name] = run_child(plan[name], args.timeout)
        rows[name]["wall_s"] = round(time.time() - t0, 1)
        print(name, json.dumps({k: v for k, v in rows[name].items() if k != "stderr"}), flush=True)
        if "stderr" in rows[name]:
            print(rows[name]["stderr"][-1500:], flush=True)
    result = {
        "benchmark": "moe_gpu: DeepSeek-V2-Lite shape, seq 2048 x batch 4, LoRA r16 on attention (+ experts)",
        "date": time.strftime("%Y-%m-%d"),
        "card": torch.cuda.get_device_name(0),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "command": "PYTHONPATH=$PWD/src python bench/moe_gpu.py --anchor .gpu/anchor_moe.py",
        "runs": rows,
    }
    hf_attn = rows.get("hf-attn", {}).get("tok_s")
    hf_all = rows.get("hf-all", {}).get("tok_s")
    ours = rows.get("fast", {})
    if hf_attn and ours.get("tok_s"):
        result["targets"] = {
            "vs_hf_attention_only": round(ours["tok_s"] / hf_attn, 3),
            "peak_le_hf_attention_only": ours["peak_gib"] <= rows["hf-attn"]["peak_gib"],
            "met_at_least_hf_attention_only": ours["tok_s"] >= hf_attn
            and ours["peak_gib"] <= rows["hf-attn"]["peak_gib"],
            "vs_hf_all_experts": round(ours["tok_s"] / hf_all, 3) if hf_all else None,
            "goal_2x_all_experts_met": bool(hf_all and ours["tok_s"] >= 2 * hf_all),
        }
    out = Path(os.environ.get("OUT", ".")) / Path(args.out).name if os.environ.get("OUT") else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result.get("targets", {})), flush=True)


if __name__ == "__main__":
    main()
