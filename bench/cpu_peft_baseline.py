"""Plain transformers + PEFT LoRA baseline on the deftune demo task (no deftune imports).

Usage (the model folder is an fp32 save of SmolLM2-135M-Instruct, e.g. /tmp/smol_fp32):

    python bench/cpu_peft_baseline.py --model /tmp/smol_fp32 --steps 60 --score --eval-samples 200

Trains LoRA on src/deftune/assets/demo_train.jsonl with the seed template
("### Instruction:\\n{query}\\n### Response:\\n" + response + EOS, loss on response+EOS only),
prints one JSON line with tokens/s (non-pad tokens per second over the timed steps, the first
optimizer step excluded as warm-up), then with --score the greedy exact match on the held-out
split before and after training.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

ASSETS = Path(__file__).resolve().parent.parent / "src" / "deftune" / "assets"
PROMPT = "### Instruction:\n{query}\n### Response:\n"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def encode(tok, rec: dict) -> tuple[list[int], list[int]]:
    prompt_ids = tok(PROMPT.format(query=rec["query"]), add_special_tokens=False)["input_ids"]
    resp_ids = tok(rec["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return prompt_ids + resp_ids, [-100] * len(prompt_ids) + resp_ids


def collate(batch, pad_id):
    n = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    attn = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):  # right padding for training
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attn[i, : len(ids)] = 1
    return input_ids, labels, attn


@torch.no_grad()
def score(model, tok, records, batch_size=32, max_new_tokens=16):
    model.eval()
    tok.padding_side = "left"
    hits, samples = 0, []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        enc = tok([PROMPT.format(query=r["query"]) for r in chunk], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for r, t in zip(chunk, texts):
            pred = t.strip()
            for marker in ("\n", "###"):
                pred = pred.split(marker, 1)[0]
            hits += pred.strip() == r["response"]
            if len(samples) < 4:
                samples.append((r["response"], t))
    model.train()
    return hits / max(len(records), 1), samples


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="fp32 model folder (save_pretrained output)")
    ap.add_argument("--train", type=Path, default=ASSETS / "demo_train.jsonl")
    ap.add_argument("--eval", type=Path, default=ASSETS / "demo_eval.jsonl")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the steps")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--layers", type=int, default=None,
                    help="LoRA only on the last N decoder layers (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--score", action="store_true")
    ap.add_argument("--skip-base-score", action="store_true")
    ap.add_argument("--eval-samples", type=int, default=200)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.config.use_cache = True

    eval_recs = load_jsonl(args.eval)[: args.eval_samples]
    result = {}
    if args.score and not args.skip_base_score:
        t0 = time.perf_counter()
        result["exact_match_before"], s = score(model, tok, eval_recs)
        result["score_before_s"] = round(time.perf_counter() - t0, 1)
        print("base samples:", s, flush=True)

    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers - args.layers, n_layers)) if args.layers else None
    cfg = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=args.targets.split(","), layers_to_transform=layers)
    model = get_peft_model(model, cfg)
    model.train()
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    data = [encode(tok, r) for r in load_jsonl(args.train)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warm = max(1, int(round(args.warmup * args.steps)))

    def lr_at(step):  # step is 0-based; linear warm-up then cosine to 0
        if step < warm:
            return (step + 1) / warm
        prog = (step - warm) / max(1, args.steps - warm)
        return 0.5 * (1 + math.cos(math.pi * prog))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    order, pos = [], 0
    timed_tokens, timed_s, losses = 0, 0.0, []
    t_train = time.perf_counter()
    for step in range(args.steps):
        t0 = time.perf_counter()
        step_tokens, step_loss = 0, 0.0
        micro = []
        for _ in range(args.grad_accum):
            batch = []
            for _ in range(args.micro_batch):
                if pos >= len(order):
                    order, pos = list(range(len(data))), 0
                    rng.shuffle(order)
                batch.append(data[order[pos]])
                pos += 1
            micro.append(collate(batch, tok.pad_token_id))
        n_lab = sum(int((lab[:, 1:] != -100).sum()) for _, lab, _ in micro)
        for input_ids, labels, attn in micro:
            logits = model(input_ids=input_ids, attention_mask=attn).logits[:, :-1]
            tgt = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                                                     ignore_index=-100, reduction="sum") / n_lab
            loss.backward()
            step_loss += loss.item()
            step_tokens += int(attn.sum())
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses.append(step_loss)
        if step > 0:
            timed_tokens += step_tokens
            timed_s += dt
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps} loss {step_loss:.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{dt:.2f}s", flush=True)
    train_s = time.perf_counter() - t_train

    result.update({
        "tokens_per_s": round(timed_tokens / timed_s, 1) if timed_s else None,
        "steps": args.steps,
        "s_per_step": round(timed_s / max(1, args.steps - 1), 3),
        "train_s": round(train_s, 1),
        "final_loss": round(losses[-1], 4),
        "mean_loss_last10": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "lr": args.lr, "batch": args.micro_batch * args.grad_accum, "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum, "warmup_steps": warm, "r": args.r, "alpha": args.alpha,
        "targets": args.targets, "layers": args.layers or n_layers, "trainable_params": n_trainable,
        "threads": torch.get_num_threads(),
    })
    if args.score:
        t0 = time.perf_counter()
        result["exact_match_after"], s = score(model, tok, eval_recs)
        result["score_after_s"] = round(time.perf_counter() - t0, 1)
        print("tuned samples:", s, flush=True)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
