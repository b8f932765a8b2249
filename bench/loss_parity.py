"""Loss parity on the GPU: deftune's fast path vs HF + PEFT, 50 steps, same data, init and seed (bf16).

    PYTHONPATH=$PWD/src python bench/loss_parity.py --shape llama-1b --out bench/results/loss_parity.json
    python bench/loss_parity.py --shape tiny --device cpu --steps 4      # CPU smoke test

Both sides start from the same random-init model folder (bench/_bench_common.make_model_folder) and the
same LoRA initialisation (deftune's A/B copied into PEFT's modules), LoRA r=16 alpha=16 dropout 0 on
q,k,v,o,gate,up,down, AdamW lr 1e-3 (no weight decay) + clip 1.0, gradient checkpointing, the same batches:
a learnable synthetic task (each row repeats a random 64-token block, so induction lowers the loss).
deftune runs model.fast=true with train.offload_activations (the benchmark's headline configuration).
Pass: every step's loss within 1% relative. Then the deftune adapter is saved in PEFT's format, loaded by
``peft.PeftModel.from_pretrained`` and its logits compared with deftune's.
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
from _bench_common import LORA_TARGETS, make_model_folder, versions  # noqa: E402


def batches(vocab: int, steps: int, bs: int, seq: int, device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(steps):
        block = torch.randint(10, vocab, (bs, 64), generator=gen)
        out.append(block.repeat(1, (seq + 63) // 64)[:, :seq].to(device))
    return out


def run_deftune(folder: str, data, args) -> tuple[list[float], dict, torch.nn.Module, object]:
    from deftune.config import load_recipe
    from deftune.models.load import load_model
    from deftune.recipes.sft import enable_checkpointing, prepare_model
    from deftune.training.loss import response_loss_sum

    offload = args.device == "cuda"
    recipe = load_recipe(
        None,
        [
            f"model={folder}",
            f"device={args.device}",
            "method=lora",
            "model.attn_implementation=sdpa",
            "adapter.targets=all-linear",
            "adapter.rank=16",
            "adapter.alpha=16",
            "adapter.dropout=0",
            "model.fast=true",
            "train.gradient_checkpointing=true",
            f"train.offload_activations={'true' if offload else 'false'}",
            f"model.dtype={'bfloat16' if args.device == 'cuda' else 'float32'}",
        ],
    )
    device = torch.device(args.device)
    model, _, _ = load_model(recipe.model, device)
    torch.manual_seed(0)
    spec = prepare_model(recipe, model, device)
    enable_checkpointing(recipe, model)  # as api.train does (a no-op under offloading)
    model.config.use_cache = False
    model.train()
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=args.device == "cuda")
    losses = []
    for x in data:
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            loss_sum, n = response_loss_sum(model, {"input_ids": x, "labels": x})
        loss = loss_sum / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, init, model, spec


def run_peft(folder: str, data, init: dict, args) -> tuple[list[float], torch.nn.Module]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(
        args.device
    )
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS)
    )
    copied = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                key = name.removeprefix("base_model.model.").replace(".default", "")
                p.copy_(init[key])
                copied += 1
    assert copied == len(init), (copied, len(init))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=args.device == "cuda")
    losses = []
    for x in data:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--bs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default="bench/results/loss_parity.json")
    args = ap.parse_args()
    folder = tempfile.mkdtemp(prefix=f"parity_{args.shape}_")
    make_model_folder(args.shape, folder, device=args.device)
    vocab = json.loads(Path(folder, "config.json").read_text())["vocab_size"]
    data = batches(vocab, args.steps, args.bs, args.seq, args.device)
    t0 = time.time()
    ours, init, model, spec = run_deftune(folder, data, args)
    t_ours = time.time() - t0
    probe = data[0][:1, :256]
    with torch.no_grad():
        model.eval()
        ours_logits = model(input_ids=probe).logits.float()
    from deftune.adapters.peft_format import save_adapter

    adapter_dir = save_adapter(model, spec, Path(folder) / "adapter", folder)
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    t0 = time.time()
    theirs, peft_model = run_peft(folder, data, init, args)
    t_theirs = time.time() - t0
    del peft_model
    rel = [abs(a - b) / abs(b) for a, b in zip(ours, theirs)]
    # The trained adapter in PEFT: load it over the base and compare logits with deftune's.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(
        args.device
    )
    loaded = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        peft_logits = loaded(input_ids=probe).logits.float()
    logit_diff = float((peft_logits - ours_logits).abs().max())
    logit_scale = float(ours_logits.abs().max())
    result = {
        "benchmark": "loss_parity: deftune fast path vs HF+PEFT, same init/data/seed, LoRA r16 all-linear",
        "date": time.strftime("%Y-%m-%d"),
        "card": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "versions": versions(),
        "shape": args.shape,
        "steps": args.steps,
        "bs": args.bs,
        "seq": args.seq,
        "lr": args.lr,
        "deftune_losses": [round(x, 5) for x in ours],
        "peft_losses": [round(x, 5) for x in theirs],
        "max_rel_diff": round(max(rel), 5),
        "mean_rel_diff": round(sum(rel) / len(rel), 5),
        "parity_within_1pct": max(rel) <= 0.01,
        "seconds": {"deftune": round(t_ours, 1), "peft": round(t_theirs, 1)},
        "peft_loads_adapter": {
            "max_abs_logit_diff": round(logit_diff, 5),
            "max_abs_logit": round(logit_scale, 3),
        },
        "command": f"PYTHONPATH=$PWD/src python bench/loss_parity.py --shape {args.shape}",
    }
    out = Path(os.environ["OUT"]) / Path(args.out).name if os.environ.get("OUT") else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_losses")}), flush=True)
    print("first/last losses deftune", ours[:3], ours[-3:], "peft", theirs[:3], theirs[-3:], flush=True)


if __name__ == "__main__":
    main()
