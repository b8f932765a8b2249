"""The user path end to end: ``deftune train`` with its defaults against Unsloth's documented path.

    PYTHONPATH=/tmp/site:$PWD/src python bench/train_e2e.py --shape llama-1b --bs 8 --seq 2048 \\
        --precisions 16,4 --rounds 3 [--variants "fast:model.fast=true,train.offload_activations=true"]
    python bench/train_e2e.py --shape tiny --device cpu --rounds 1        # CPU smoke (seq 64, bs 2)

A random-init model folder of the shape (``_bench_common.make_model_folder``) and a JSONL of
instruction records ({"instruction", "output"}) that each fill ``--seq`` tokens exactly with the folder's
tokenizer under deftune's default template, so every step trains ``bs x seq`` tokens. Rows, each in its
own process, ``--rounds`` rounds with every other round reversed:

- ``deftune defaults``: ``deftune train key=value ...`` (``deftune.cli.main`` in a child process) with
  only the workload's keys set (model, data, run folder, batch, length, steps, LoRA r=16 alpha=16 on all
  linear layers, scoring/report/TensorBoard off, one metrics line per step; ``model.quantize=nf4`` for
  4-bit); everything else is what a user gets. ``--variants "label:key=v,key=v;..."`` adds rows with
  more keys; a key this checkout does not know gives status "skipped: unknown key".
- ``unsloth sft``: FastLanguageModel + get_peft_model(use_gradient_checkpointing="unsloth") + TRL
  SFTTrainer (bf16, adamw_torch_fused, max_grad_norm 1, lr 2e-4, same batch and length).
- ``unsloth step`` (bench/_unsloth_step.py) and ``hf+peft`` (bench/_hf_step.py, ``--bnb4`` at 4-bit):
  bare steps on random tokens, the baselines of bench/gpu_peers.py.

tokens/s (``tok_s``) = tokens of the timed steps / wall time from the end of the last warm-up step to
the end of the last step (deftune: metrics.jsonl ``elapsed_s``; Unsloth: a callback's synchronized
step-end times), so everything the loop does between steps counts; ``tok_s_median_step`` is the median
over the timed steps of tokens / the step's own time. The bare-step rows report their median step.
Memory: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` read in the row's process after
training (the whole process: loading and quantizing included), host RSS peak (``ru_maxrss``, pinned
pages included once touched) and current RSS; the bare-step runners reset the allocated peak before
their timed steps, so theirs covers those steps only.
Ratios: each deftune row over ``unsloth sft`` of its precision, per round and their median (issue 20
goal: >= 1.3x at <= its reserved memory; at least 1.15x).

The JSON (``--out``, default bench/results/train_e2e_<shape>.json) is rewritten after every row; it names
the card, versions, sources digest, date and command, and keeps every row of every round.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _bench_common import SHAPES, src_digest, versions  # noqa: E402
from gpu_peers import _on_term, parse_variants, run_one, schedule, tail, write  # noqa: E402

SFT_PEER = "unsloth sft"
GOAL_RATIO, MIN_RATIO = 1.3, 1.15
# Rows that need the GPU and the peer wheels (the deftune rows run on either device).
CUDA_ONLY_KINDS = ("unsloth_sft", "unsloth_step", "hf_step")
CPU_SMOKE = {"bs": 2, "seq": 64, "steps": 3, "warmup": 1}
GPU_DEFAULTS = {"bs": 8, "seq": 2048, "steps": 8, "warmup": 3}


def row_name(base: str, precision: int) -> str:
    return base if precision == 16 else f"{base} 4bit"


def row_plan(precisions: list[int], variants: list[tuple[str, list[str]]] = ()) -> list[dict]:
    """Row specs in run order per precision: what the goal compares first (deftune defaults, Unsloth SFT),
    then the variants, then the bare steps."""
    plan = []
    for prec in precisions:
        q4 = prec == 4
        plan.append({"name": row_name("deftune defaults", prec), "precision": prec, "kind": "deftune",
                     "role": "deftune", "sets": []})
        plan.append({"name": row_name(SFT_PEER, prec), "precision": prec, "kind": "unsloth_sft",
                     "role": "peer", "cmd": ["_unsloth_sft_row.py"] + (["--load4bit"] if q4 else [])})
        for label, kvs in variants:
            plan.append({"name": row_name(f"deftune {label}", prec), "precision": prec, "kind": "deftune",
                         "role": "deftune", "sets": list(kvs)})
        plan.append({"name": row_name("unsloth step", prec), "precision": prec, "kind": "unsloth_step",
                     "role": "baseline",
                     "cmd": ["_step_row.py", "_unsloth_step.py"] + (["--load4bit"] if q4 else [])})
        plan.append({"name": row_name("hf+peft", prec), "precision": prec, "kind": "hf_step",
                     "role": "baseline", "cmd": ["_step_row.py", "_hf_step.py"] + (["--bnb4"] if q4 else [])})
    return plan


def step_timing(records: list[dict], warmup: int) -> dict:
    """Timing of a run from its per-step records ``{"step", "tokens", "elapsed_s"[, "step_s"]}``
    (``elapsed_s``: wall time from the start of training to the end of that step).

    tok_s = sum(tokens of steps > warmup) / (elapsed_s[last] - elapsed_s[warmup]) (elapsed from 0 when
    warmup is 0); tok_s_median_step = median over those steps of tokens / step_s (``tokens_per_s`` is
    taken when a record has no ``step_s``). Skipped or event records (no ``elapsed_s``) are left out and
    counted."""
    steps = sorted((r for r in records if "elapsed_s" in r and "tokens" in r and not r.get("skipped")),
                   key=lambda r: r["step"])
    out = {"steps_logged": len(steps), "last_step": steps[-1]["step"] if steps else 0}
    if not steps:
        return {**out, "status": "error: no step records"}
    timed = [r for r in steps if r["step"] > warmup]
    before = [r for r in steps if r["step"] <= warmup]
    if not timed or (warmup and not before):
        return {**out, "status": f"error: no step after the {warmup} warm-up steps"}
    t0 = before[-1]["elapsed_s"] if before else 0.0
    span = timed[-1]["elapsed_s"] - t0
    tokens = sum(r["tokens"] for r in timed)
    per_step = []
    for r in timed:
        if r.get("step_s"):
            per_step.append(r["tokens"] / r["step_s"])
        elif r.get("tokens_per_s"):
            per_step.append(r["tokens_per_s"])
    out.update(status="ok", timed_steps=len(timed), timed_tokens=tokens, timed_s=round(span, 4),
               tok_s=round(tokens / span, 1) if span > 0 else None,
               tok_s_median_step=round(statistics.median(per_step), 1) if per_step else None,
               first_step_s=round(steps[0]["elapsed_s"], 3) if steps[0]["step"] == 1 else None,
               tokens_per_step=sorted({r["tokens"] for r in steps}))
    if out["tok_s"] is None:
        out["status"] = "error: zero timed span"
    return out


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per name (first-seen order): medians over its ok rounds of tok_s and tok_s_median_step,
    the largest memory peaks, and every round's tok_s; a name without an ok round keeps its first row."""
    by_name: dict[str, list[dict]] = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(row)
    out = []
    for name, group in by_name.items():
        ok = [r for r in group if r.get("status") == "ok"]
        if not ok:
            out.append({k: v for k, v in group[0].items() if k != "round"})
            continue
        merged = {"name": name, "precision": ok[0]["precision"], "role": ok[0].get("role"), "status": "ok",
                  "rounds_ok": len(ok), "rounds_tok_s": [r.get("tok_s") for r in group]}
        for key in ("tok_s", "tok_s_median_step", "first_step_s", "wall_s"):
            vals = [r[key] for r in ok if r.get(key) is not None]
            merged[key] = round(statistics.median(vals), 3 if key.endswith("_s") and key != "tok_s" else 1) \
                if vals else None
        for key in ("peak_alloc_gib", "peak_reserved_gib", "host_rss_peak_gib", "host_rss_gib"):
            vals = [r[key] for r in ok if r.get(key) is not None]
            merged[key] = max(vals) if vals else None
        out.append(merged)
    return out


def ratios(rows: list[dict], precisions: list[int]) -> dict:
    """Every deftune row over ``unsloth sft`` of its precision: per round, their median, the ratio of the
    medians, and reserved memory against the peer's."""
    summary = {r["name"]: r for r in aggregate(rows)}
    by_round: dict[tuple[int, str], float] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("tok_s"):
            by_round[(r.get("round", 1), r["name"])] = r["tok_s"]
    out = {}
    for prec in precisions:
        peer = row_name(SFT_PEER, prec)
        for name, agg in summary.items():
            if agg.get("precision") != prec or agg.get("role") != "deftune":
                continue
            entry: dict = {"peer": peer}
            rounds = sorted({k for k, _ in by_round})
            per_round = [round(by_round[(k, name)] / by_round[(k, peer)], 3)
                         for k in rounds if (k, name) in by_round and (k, peer) in by_round]
            p = summary.get(peer, {})
            if agg.get("status") != "ok" or p.get("status") != "ok" or not per_round:
                entry.update(met=None,
                             why=f"{name}: {agg.get('status')}, {peer}: {p.get('status', 'not run')}")
                out[name] = entry
                continue
            med = statistics.median(per_round)
            entry.update(round_ratios=per_round, ratio_median=round(med, 3),
                         ratio_of_medians=round(agg["tok_s"] / p["tok_s"], 3),
                         ratio_median_step=round(agg["tok_s_median_step"] / p["tok_s_median_step"], 3)
                         if agg.get("tok_s_median_step") and p.get("tok_s_median_step") else None,
                         reserved_gib=agg.get("peak_reserved_gib"),
                         peer_reserved_gib=p.get("peak_reserved_gib"))
            mem_ok = None
            if agg.get("peak_reserved_gib") is not None and p.get("peak_reserved_gib") is not None:
                mem_ok = agg["peak_reserved_gib"] <= p["peak_reserved_gib"]
            entry.update(reserved_le_peer=mem_ok, goal_1_3x=med >= GOAL_RATIO, floor_1_15x=med >= MIN_RATIO,
                         met=bool(mem_ok) and med >= GOAL_RATIO)
            out[name] = entry
    return out


def table(rows: list[dict], rat: dict) -> str:
    head = (f"{'row':<28} {'status':<22} {'tok/s':>10} {'step tok/s':>10} {'x sft':>6} {'alloc':>7} "
            f"{'reserv':>7} {'rss pk':>7} {'1st s':>7}")
    lines = [head, "-" * len(head)]

    def f(v, nd=1):
        return "-" if v is None else (f"{v:,.{nd}f}" if isinstance(v, (int, float)) else str(v))

    for r in aggregate(rows):
        x = rat.get(r["name"], {}).get("ratio_median")
        lines.append(f"{r['name']:<28} {str(r.get('status'))[:22]:<22} {f(r.get('tok_s')):>10} "
                     f"{f(r.get('tok_s_median_step')):>10} {f(x, 3):>6} {f(r.get('peak_alloc_gib'), 2):>7} "
                     f"{f(r.get('peak_reserved_gib'), 2):>7} {f(r.get('host_rss_peak_gib'), 2):>7} "
                     f"{f(r.get('first_step_s'), 2):>7}")
    return "\n".join(lines)


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--precisions", default="", help="16, 4 or both (default 16,4; NF4 has a CPU path)")
    ap.add_argument("--bs", type=int, default=None, help="micro-batch (default 8; CPU 2)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per record (default 2048; CPU 64)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 8; CPU 3)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; CPU 1)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--only", default="", help="comma-separated row names (default: all)")
    ap.add_argument("--variants", default="",
                    help='more deftune rows: "label:key=v,key=v;label2:..." (each at every precision)')
    ap.add_argument("--out", default="")
    ap.add_argument("--model-dir", default="", help="default /tmp/deftune_bench_<shape> (made if missing)")
    ap.add_argument("--timeout", type=float, default=420, help="seconds per row")
    ap.add_argument("--budget", type=float, default=0, help="soft total seconds (0 = none)")
    a = ap.parse_args(argv)
    defaults = CPU_SMOKE if a.device == "cpu" else GPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.precisions = [int(p) for p in (a.precisions or "16,4").split(",") if p.strip()]
    return a


def main(argv=None) -> int:
    a = _args(argv)
    signal.signal(signal.SIGTERM, _on_term)
    t_start = time.time()
    deadline = t_start + a.budget if a.budget else float("inf")
    out = Path(a.out or REPO / "bench" / "results" / f"train_e2e_{a.shape}.json")
    logs = out.with_name(out.stem + "_logs")
    logs.mkdir(parents=True, exist_ok=True)
    model_dir = a.model_dir or f"/tmp/deftune_bench_{a.shape}"
    scratch = Path(tempfile.mkdtemp(prefix="train_e2e_"))
    data_path = scratch / f"records_{a.shape}_seq{a.seq}.jsonl"
    env = dict(os.environ)
    src = str(REPO / "src")
    if src not in env.get("PYTHONPATH", "").split(os.pathsep):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), src) if p)
    for key, value in dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                           UNSLOTH_DISABLE_STATISTICS="1", TOKENIZERS_PARALLELISM="false").items():
        env.setdefault(key, value)
    py = sys.executable
    variants = parse_variants(a.variants)
    n_records = a.bs * (a.warmup + a.steps)
    result = {
        "benchmark": "train_e2e: `deftune train` defaults (the user path) vs Unsloth's documented SFT path, "
                     "one card",
        "command": " ".join(["python", "bench/train_e2e.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "card": None, "versions": versions(), "src_digest": src_digest(),
        "workload": {"shape": a.shape, "shape_config": SHAPES[a.shape], "bs": a.bs, "seq": a.seq,
                     "warmup": a.warmup, "steps": a.steps, "precisions": a.precisions, "rounds": a.rounds,
                     "records": n_records,
                     "data": "JSONL {instruction, output}, each record exactly seq tokens under deftune's "
                             "default template (prompt ~1/4, response the rest, EOS included)",
                     "lora": "r=16 alpha=16 on q,k,v,o,gate,up,down", "variants": a.variants,
                     "tok_s": "tokens of the timed steps / wall time from the end of the last warm-up step "
                              "to the end of the last step (median over rounds)",
                     "tok_s_median_step": "median over timed steps of tokens / that step's own time"},
        "rows": [], "summary": [], "ratios": {}, "notes": [],
    }

    def save() -> None:
        result["summary"] = aggregate(result["rows"])
        result["ratios"] = ratios(result["rows"], a.precisions)
        result["elapsed_s"] = round(time.time() - t_start, 1)
        write(out, result)

    if a.device == "cpu" and a.shape != "tiny":
        print("--device cpu is for smoke tests with --shape tiny", file=sys.stderr)
        return 2
    has_cuda = False
    if a.device == "cuda":
        # The card and its bf16 matmul ceiling from a child: the driver holds no CUDA context while rows run.
        probe, text, rc, _ = run_one([py, str(HERE / "_bench_common.py"), "ceiling"], 120, env)
        has_cuda = bool(probe)
        result.update(card=(probe or {}).get("card"), card_total_gib=(probe or {}).get("total_gib"),
                      ceiling_tflops=(probe or {}).get("ceiling_tflops"))
        if not has_cuda:
            msg = ("No CUDA GPU visible: this benchmark needs one. CPU smoke test of the plumbing: "
                   "python bench/train_e2e.py --shape tiny --device cpu --rounds 1")
            print(msg, file=sys.stderr)
            result.update(status="no_cuda", notes=[msg])
            save()
            return 2
    else:
        result["card"] = "cpu (smoke test)"
    if importlib.util.find_spec("unsloth") is None:
        result["notes"].append("unsloth is not importable here (PYTHONPATH=/tmp/site after installing the "
                               "peer wheels): its rows will say so")

    prep_cmd = [py, str(HERE / "_deftune_train_row.py"), "prepare", "--shape", a.shape,
                "--model-dir", model_dir, "--data", str(data_path), "--records", str(n_records),
                "--seq", str(a.seq), "--device", a.device]
    made, text, rc, timed_out = run_one(prep_cmd, min(600, max(deadline - time.time(), 30)), env)
    result["model_folder"] = made or {"error": tail(text, 1500), "rc": rc, "timed_out": timed_out}
    print(f"model folder and data: {made or 'FAILED'}", flush=True)
    if not made or made.get("status", "ok") != "ok":
        result["status"] = "model folder or data could not be made"
        save()
        print(tail(text, 1500), file=sys.stderr)
        return 1
    save()

    only = {s.strip() for s in a.only.split(",") if s.strip()}
    specs = [s for s in row_plan(a.precisions, variants) if not only or s["name"] in only]
    common = ["--model-dir", model_dir, "--shape", a.shape, "--bs", str(a.bs), "--seq", str(a.seq),
              "--steps", str(a.steps), "--warmup", str(a.warmup)]
    walls: dict[str, float] = {}
    for round_no, spec in schedule(specs, a.rounds):
        row = {"name": spec["name"], "precision": spec["precision"], "role": spec["role"], "round": round_no}
        left = deadline - time.time()
        if spec["kind"] in CUDA_ONLY_KINDS and not has_cuda:
            row["status"] = "skipped: no CUDA"
        elif left < max(20.0, walls.get(spec["name"], 0.0)):
            row["status"] = "skipped: time budget"
        else:
            stem = spec["name"].replace(" ", "_").replace("+", "") + f"_round{round_no}"
            run_dir = scratch / stem
            if spec["kind"] == "deftune":
                cmd = [py, str(HERE / "_deftune_train_row.py"), "train", *common, "--data", str(data_path),
                       "--out-dir", str(run_dir), "--precision", str(spec["precision"]), "--device", a.device]
                cmd += [arg for kv in spec["sets"] for arg in ("--set", kv)]
            elif spec["kind"] == "unsloth_sft":
                cmd = [py, str(HERE / spec["cmd"][0]), *spec["cmd"][1:], *common, "--data", str(data_path),
                       "--out-dir", str(run_dir)]
            else:
                cmd = [py, str(HERE / spec["cmd"][0]), *spec["cmd"][1:], *common]
            if spec.get("sets"):
                row["sets"] = spec["sets"]
            print(f"[{time.time() - t_start:6.0f}s] {spec['name']} (round {round_no}) ...", flush=True)
            t0 = time.time()
            res, text, rc, timed_out = run_one(cmd, min(a.timeout, left), env)
            row["wall_s"] = round(time.time() - t0, 1)
            walls[spec["name"]] = max(walls.get(spec["name"], 0.0), row["wall_s"])
            (logs / f"{stem}.log").write_text(text)
            shutil.rmtree(run_dir, ignore_errors=True)
            if res is None:
                row.update(status="timeout" if timed_out else "error",
                           error=f"timed out after {row['wall_s']}s" if timed_out
                           else f"exited with code {rc}, no result line", output_tail=tail(text))
            else:
                res.pop("impl", None)
                row.update(res)
                if res.get("status") != "ok":
                    row["output_tail"] = tail(text)
        result["rows"].append(row)
        print(f"    {row['name']:<28} {row['status'][:40]:<40} tok/s {row.get('tok_s', '-')}  "
              f"reserved {row.get('peak_reserved_gib', '-')} GiB  {str(row.get('error', ''))[:160]}",
              flush=True)
        save()

    shutil.rmtree(scratch, ignore_errors=True)
    result["status"] = "done"
    save()
    for name, r in result["ratios"].items():
        if r.get("met") is None:
            print(f"{name} vs {r['peer']}: not decided ({r.get('why')})")
        else:
            print(f"{name} vs {r['peer']}: {r['ratio_median']}x (rounds {r['round_ratios']}), reserved "
                  f"{r['reserved_gib']} vs {r['peer_reserved_gib']} GiB; goal 1.3x at <= reserved: "
                  f"{'MET' if r['met'] else 'not met'}; floor 1.15x: {'yes' if r['floor_1_15x'] else 'no'}")
    print(f"wrote {out}")
    print(table(result["rows"], result["ratios"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
