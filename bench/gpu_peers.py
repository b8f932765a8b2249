"""deftune vs HF+PEFT, HF+PEFT+Liger and Unsloth on one GPU: LoRA step throughput, peak memory and MFU.

    PYTHONPATH=/tmp/site:$PWD/src python bench/gpu_peers.py --shape llama-1b --bs 8 --seq 2048 \\
        [--precisions 16,4] [--tag NAME] [--out-dir bench/results] [--steps 8] [--budget-s 200]
    PYTHONPATH=$PWD/src python bench/gpu_peers.py --shape tiny --bs 2 --seq 64 --device cpu   # CPU smoke

(bench/gpu_issue6.sh runs it for both ANCHORS shapes with the peer wheels installed.)

The result goes to a stable name in ``--out-dir`` (``result_name``): ``gpu_peers_<shape>.json`` for both
precisions, ``gpu_peers_<shape>_<p>bit.json`` for one, ``_<tag>`` added for an experiment's call
(``--tag variants``), so a new call replaces the result it supersedes; git keeps the old ones.

One invocation, one card. Every framework runs in its own subprocess (Unsloth patches transformers on
import) and prints one ``BENCH_JSON`` line; a framework that fails, hangs or is missing becomes a row with
its status and the tail of its output, never the end of the driver. The JSON is rewritten after every row,
so a timeout still leaves the rows done so far.

Workload (../shared/ANCHORS.md): a random-init model of the real shape saved once to a folder that every
framework loads (``_bench_common.py make``), random tokens, labels = inputs, batch ``--bs`` x ``--seq``,
LoRA r=16 alpha=16 dropout 0 on q,k,v,o,gate,up,down, fused AdamW + clip 1.0, 3 warm-up + N timed
steps; step = median, tokens/s = bs x seq / step, peak = torch.cuda.max_memory_allocated (GiB).

Rows, most valuable first (``--budget-s`` skips what no longer fits):
  16-bit: deftune fast (model.fast, offloaded checkpointing), Unsloth, then HF+PEFT, HF+PEFT+Liger,
          deftune fast without offload, deftune plain;
  4-bit:  deftune fast nf4 (model.quantize=nf4), Unsloth 4-bit, HF+PEFT QLoRA (bitsandbytes NF4).
MFU = useful FLOPs x tokens/s / the card's bf16 matmul ceiling (8192^3, best of 5, measured here);
useful FLOPs per token = forward + activation-gradient backward, no recompute (exact formula:
_bench_common.py's docstring).

Targets (issue 6), per precision: deftune fast tokens/s >= 1.15 x Unsloth's AND deftune peak <= Unsloth's.
``--rounds N`` runs the chosen rows N times, every other round in reverse order (a drift of the host over
the call then weighs on both sides alike); the targets use each row's median tokens/s and largest peak
over its rounds, and list the ratio of every round.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _bench_common import SHAPES, flops_per_token, parse_result, versions  # noqa: E402

SPEED_TARGET = 1.15


def _sets(overrides: list[str]) -> list[str]:
    return [arg for kv in overrides for arg in ("--set", kv)]


def parse_variants(text: str) -> list[tuple[str, list[str]]]:
    """``"mlp8:train.offload_mlp_layers=8;skip2:train.checkpoint_skip=2,train.offload_mlp_layers=4"`` ->
    [(label, [key=value, ...]), ...]. An item ``env:NAME=value`` sets an environment variable for that
    row's process instead (e.g. ``lb:env:CUDA_LAUNCH_BLOCKING=1``)."""
    out = []
    for part in (p.strip() for p in text.split(";") if p.strip()):
        label, _, kvs = part.partition(":")
        out.append((label.strip(), [kv.strip() for kv in kvs.split(",") if kv.strip()]))
    return out


def row_plan(precisions: list[int], offload: bool, primary_set: tuple[str, ...] = (),
             variants: tuple[tuple[str, list[str]], ...] = (), primary_set4: tuple[str, ...] = ()) -> list[dict]:
    """(name, precision, runner args) in the order they run: what the targets need first. ``primary_set``:
    recipe overrides of the primary deftune rows (``primary_set4``: more for the 4-bit one only);
    ``variants``: extra deftune fast rows (16-bit, then nf4), each the primary row of its precision plus
    its own overrides (given last, so they win) or environment, run right after the primary rows."""
    dt = ["_deftune_step.py"]
    fast16 = {"name": "deftune fast", "precision": 16, "primary": True,
              "cmd": dt + ["--fast", "1", "--quantize", "none", "--offload", str(int(offload))] + _sets(primary_set)}
    fast4 = {"name": "deftune fast nf4", "precision": 4, "primary": True,
             "cmd": dt + ["--fast", "1", "--quantize", "nf4", "--offload", str(int(offload))]
             + _sets(primary_set) + _sets(primary_set4)}
    extra = [{"name": f"deftune fast{' nf4' if prec == 4 else ''} {label}", "precision": prec,
              "cmd": dt + ["--fast", "1", "--quantize", "nf4" if prec == 4 else "none", "--offload",
                           str(int(offload))] + _sets(primary_set) + _sets(primary_set4 if prec == 4 else ())
              + _sets([kv for kv in kvs if not kv.startswith("env:")]),
              "env": dict(kv[len("env:"):].split("=", 1) for kv in kvs if kv.startswith("env:"))}
             for prec in (16, 4) for label, kvs in variants]
    plan = [
        fast16,
        *[r for r in extra if r["precision"] == 16],
        {"name": "unsloth", "precision": 16, "cmd": ["_unsloth_step.py"], "cuda_only": True, "peer": True},
        fast4,
        *[r for r in extra if r["precision"] == 4],
        {"name": "unsloth 4bit", "precision": 4, "cmd": ["_unsloth_step.py", "--load4bit"], "cuda_only": True,
         "peer": True},
        {"name": "hf+peft", "precision": 16, "cmd": ["_hf_step.py"]},
        {"name": "hf+peft+liger", "precision": 16, "cmd": ["_hf_step.py", "--liger"]},
        {"name": f"deftune fast ({'no ' if offload else ''}offload)", "precision": 16,
         "cmd": dt + ["--fast", "1", "--quantize", "none", "--offload", str(int(not offload))]},
        {"name": "deftune plain", "precision": 16,
         "cmd": dt + ["--fast", "0", "--quantize", "none", "--offload", "0"]},
        {"name": "hf+peft qlora-bnb", "precision": 4, "cmd": ["_hf_step.py", "--bnb4"], "cuda_only": True},
    ]
    return [r for r in plan if r["precision"] in precisions]


def schedule(specs: list[dict], rounds: int) -> list[tuple[int, dict]]:
    """(round, spec) in run order: round 1 as planned, round 2 reversed, round 3 as planned, ..."""
    order = []
    for k in range(1, rounds + 1):
        order += [(k, spec) for spec in (specs if k % 2 else specs[::-1])]
    return order


_RUNNING: list[subprocess.Popen] = []


def _on_term(signum, _frame) -> None:
    # A hard timeout (bench/gpu_issue6.sh) must not leave a runner holding the GPU for the next part.
    for proc in _RUNNING:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(128 + signum)


def run_one(cmd: list[str], timeout: float, env: dict) -> tuple[dict | None, str, int | None, bool]:
    """Run ``cmd`` in its own process group; returns (result, output, returncode, timed_out)."""
    # Runners take absolute paths; a scratch cwd keeps what they write there (Unsloth's compile cache) out of
    # the checkout.
    cwd = Path(tempfile.gettempdir()) / "deftune_bench_cwd"
    cwd.mkdir(exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=cwd, start_new_session=True)
    _RUNNING.append(proc)
    try:
        out, err = proc.communicate(timeout=max(timeout, 1))
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    finally:
        _RUNNING.remove(proc)
    return parse_result(out or ""), (out or "") + "\n--- stderr ---\n" + (err or ""), proc.returncode, timed_out


def tail(text: str, n: int = 2500) -> str:
    lines = [ln for ln in text.splitlines() if not ln.startswith("BENCH_JSON ")]
    return "\n".join(lines)[-n:]


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per name (first-seen order): over its rounds that ran ok, the median tokens/s, the largest
    peak and every round's figures (``rounds_tok_s``); a name with no ok round keeps its first row."""
    by_name: dict[str, list[dict]] = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(row)
    out = []
    for group in by_name.values():
        ok = [r for r in group if r.get("status") == "ok"]
        if not ok:
            out.append(group[0])
            continue
        merged = dict(ok[0])
        merged["tok_s"] = round(statistics.median(r["tok_s"] for r in ok), 1)
        peaks = [r["peak_gib"] for r in ok if r.get("peak_gib") is not None]  # none on a CPU smoke run
        merged["peak_gib"] = max(peaks) if peaks else None
        if len(group) > 1:
            merged["rounds_tok_s"] = [r.get("tok_s") for r in group]
        out.append(merged)
    return out


def round_ratios(rows: list[dict], ours: str, peer: str) -> list[float]:
    """ours / peer tokens/s within each round both ran ok in."""
    by_round: dict[int, dict[str, float]] = {}
    for row in rows:
        if row.get("status") == "ok":
            by_round.setdefault(row.get("round", 1), {})[row["name"]] = row["tok_s"]
    return [round(r[ours] / r[peer], 3) for _, r in sorted(by_round.items()) if ours in r and peer in r]


def compute_targets(all_rows: list[dict], precisions: list[int]) -> dict:
    rows = aggregate(all_rows)
    out = {}
    for prec in precisions:
        ours = next((r for r in rows if r["precision"] == prec and r.get("primary")), None)
        peer = next((r for r in rows if r["precision"] == prec and r.get("peer")), None)
        key = f"{prec}-bit"
        if not ours or not peer:
            out[key] = {"met": None, "why": "row not run (yet)"}
            continue
        if ours.get("status") != "ok" or peer.get("status") != "ok":
            why = f"{ours['name']}: {ours.get('status')}, {peer['name']}: {peer.get('status')}"
            out[key] = {"met": None, "why": why}
            continue
        ratio = ours["tok_s"] / peer["tok_s"]
        speed_ok, mem_ok = ratio >= SPEED_TARGET, ours["peak_gib"] <= peer["peak_gib"]
        out[key] = {"deftune": ours["name"], "peer": peer["name"], "speed_ratio": round(ratio, 3),
                    "speed_met": speed_ok, "deftune_peak_gib": ours["peak_gib"],
                    "peer_peak_gib": peer["peak_gib"], "memory_met": mem_ok, "met": speed_ok and mem_ok}
        # Other deftune variants of this precision that would meet both (e.g. without offload).
        others = [r["name"] for r in rows if r["precision"] == prec and r["name"].startswith("deftune")
                  and r.get("status") == "ok" and r["tok_s"] >= SPEED_TARGET * peer["tok_s"]
                  and r["peak_gib"] <= peer["peak_gib"]]
        out[key]["variants_meeting_both"] = others
        if any(r.get("round", 1) > 1 for r in all_rows):
            out[key]["tok_s_is"] = "median over rounds"
            out[key]["round_ratios"] = round_ratios(all_rows, ours["name"], peer["name"])
    return out


def result_name(shape: str, precisions: list[int], tag: str = "") -> str:
    """The stable file name of a call's result: one per shape, precision set and experiment."""
    name = f"gpu_peers_{shape}"
    if len(precisions) == 1:
        name += f"_{precisions[0]}bit"
    return name + (f"_{tag}" if tag else "") + ".json"


def write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--precisions", default="16,4")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out-dir", default=str(REPO / "bench" / "results"),
                    help="folder of the result; its name is result_name(shape, precisions, tag)")
    ap.add_argument("--tag", default="", help="experiment name added to the result's name, e.g. variants")
    ap.add_argument("--model-dir", default="",
                    help="random-init model folder (default /tmp/deftune_bench_<shape>; made if missing)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: smoke test, --shape tiny only")
    ap.add_argument("--offload", type=int, default=1, help="deftune fast rows with train.offload_activations")
    ap.add_argument("--budget-s", type=float, default=0, help="skip rows that no longer fit (0 = no budget)")
    ap.add_argument("--row-timeout-s", type=float, default=240)
    ap.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override of the primary deftune rows, e.g. train.offload_mlp_layers=8")
    ap.add_argument("--set4", action="append", default=[], metavar="KEY=VALUE",
                    help="more overrides of the primary 4-bit row only, e.g. train.reuse_dequantized=true")
    ap.add_argument("--variants", default="",
                    help='extra deftune rows: "label:key=v,key=v;label2:..." (each in 16- and 4-bit)')
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the chosen rows this many times (every other round reversed); targets on medians")
    ap.add_argument("--profile", action="store_true",
                    help="after each row's timed steps, 2 steps under torch.profiler: GPU time by kernel "
                         "family in the row, every kernel in <out>_logs/profile_<row>.json")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, _on_term)
    t_start = time.time()
    deadline = t_start + a.budget_s if a.budget_s else float("inf")
    precisions = [int(p) for p in a.precisions.split(",") if p.strip()]
    out = Path(a.out_dir) / result_name(a.shape, precisions, a.tag)
    logs = out.with_name(out.stem + "_logs")
    logs.mkdir(parents=True, exist_ok=True)
    model_dir = a.model_dir or f"/tmp/deftune_bench_{a.shape}"
    env = dict(os.environ)
    src = str(REPO / "src")
    if src not in env.get("PYTHONPATH", "").split(os.pathsep):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), src) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    py = sys.executable

    flops = flops_per_token(a.shape, a.seq)
    result = {
        "benchmark": "gpu_peers: LoRA step throughput / peak memory / MFU, deftune vs peers, one card",
        "command": " ".join(["python", "bench/gpu_peers.py"] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "card": None, "versions": versions(),
        "workload": {"shape": a.shape, "shape_config": SHAPES[a.shape], "bs": a.bs, "seq": a.seq,
                     "tokens_per_step": a.bs * a.seq, "lora": "r=16 alpha=16 dropout=0 on q,k,v,o,gate,up,down",
                     "optimizer": "AdamW fused, clip 1.0", "steps": f"3 warm-up + {a.steps} timed, median",
                     "data": "random tokens, labels = inputs", "model": "random init, bf16 safetensors folder",
                     "deftune_offload": bool(a.offload),
                     "flops_per_token": flops,
                     "mfu_definition": "useful = 4P + 3A per token (forward 2P + A, activation-gradient "
                                       "backward 2P + 2A, no recompute); P = matmul params incl. LM head, "
                                       "A = 2*L*seq*d_attn (causal); mfu_2x_fwd uses 4P + 2A"},
        "ceiling_tflops": None, "rows": [], "targets": {}, "notes": [],
    }

    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        msg = ("No CUDA GPU visible (torch.cuda.is_available() is False): this benchmark needs one. "
               "For a CPU smoke test of the plumbing: python bench/gpu_peers.py --shape tiny --bs 2 --seq 64 "
               "--device cpu")
        print(msg, file=sys.stderr)
        result["status"] = "no_cuda"
        result["notes"].append(msg)
        write(out, result)
        return 2
    if a.device == "cpu" and a.shape != "tiny":
        print("--device cpu is for smoke tests with --shape tiny", file=sys.stderr)
        return 2
    if a.device == "cpu" and a.offload:
        a.offload = 0
        result["workload"]["deftune_offload"] = False
        result["notes"].append("cpu smoke test: train.offload_activations needs CUDA; deftune rows run "
                               "without it")

    def save() -> None:
        result["targets"] = compute_targets(result["rows"], precisions)
        result["elapsed_s"] = round(time.time() - t_start, 1)
        write(out, result)

    # The card's matmul ceiling (own process: the driver holds no CUDA context while frameworks run).
    if a.device == "cuda":
        ceil, text, rc, _ = run_one([py, str(HERE / "_bench_common.py"), "ceiling"], 120, env)
        if ceil:
            result.update(card=ceil["card"], card_total_gib=ceil["total_gib"],
                          ceiling_tflops=ceil["ceiling_tflops"])
        else:
            result["notes"].append(f"matmul ceiling failed (rc {rc}): {tail(text, 800)}")
    else:
        result["card"] = "cpu (smoke test; no MFU)"
    print(f"card {result['card']}, bf16 ceiling {result['ceiling_tflops']} TFLOP/s", flush=True)

    made, text, rc, timed_out = run_one([py, str(HERE / "_bench_common.py"), "make", "--shape", a.shape,
                                         "--dir", model_dir, "--device", a.device],
                                        min(420, max(deadline - time.time(), 1)), env)
    result["model_folder"] = made or {"error": tail(text, 1500), "rc": rc, "timed_out": timed_out}
    print(f"model folder: {result['model_folder']}", flush=True)
    if not made:
        result["status"] = "model folder could not be made"
        save()
        return 1
    save()

    only = {s.strip() for s in a.only.split(",") if s.strip()}
    common = ["--model-dir", model_dir, "--shape", a.shape, "--bs", str(a.bs), "--seq", str(a.seq),
              "--steps", str(a.steps)]
    result["workload"]["deftune_primary_overrides"] = list(a.set)
    result["workload"]["deftune_primary_4bit_overrides"] = list(a.set) + list(a.set4)
    if a.rounds < 1:
        print("--rounds must be >= 1", file=sys.stderr)
        return 2
    plan = row_plan(precisions, bool(a.offload), tuple(a.set), tuple(parse_variants(a.variants)), tuple(a.set4))
    specs = [spec for spec in plan if not only or spec["name"] in only]
    for round_no, spec in schedule(specs, a.rounds):
        row = {"name": spec["name"], "precision": spec["precision"]}
        row.update({k: True for k in ("primary", "peer") if spec.get(k)})
        if a.rounds > 1:
            row["round"] = round_no
        left = deadline - time.time()
        if a.device == "cpu" and spec.get("cuda_only"):
            row.update(status="skipped", error="needs CUDA")
        elif left < 20:
            row.update(status="skipped", error=f"time budget (--budget-s {a.budget_s:g}) used up")
        else:
            cmd = [py, str(HERE / spec["cmd"][0])] + spec["cmd"][1:] + common
            if not spec["name"].startswith("unsloth"):
                cmd += ["--device", a.device]
            t0 = time.time()
            print(f"[{time.time() - t_start:6.0f}s] {spec['name']} ...", flush=True)
            stem = spec["name"].replace(" ", "_").replace("(", "").replace(")", "")
            if a.rounds > 1:
                stem += f"_round{round_no}"
            row_env = {**env, **spec.get("env", {})}
            if spec.get("env"):
                row["env"] = spec["env"]
            if a.profile:
                row_env = {**row_env, "BENCH_PROFILE_OUT": str(logs / f"profile_{stem}.json")}
            res, text, rc, timed_out = run_one(cmd, min(a.row_timeout_s, left), row_env)
            row["wall_s"] = round(time.time() - t0, 1)
            (logs / (stem + ".log")).write_text(text)
            if res is None:
                why = (f"timed out after {row['wall_s']}s" if timed_out
                       else f"exited with code {rc}, no result line")
                row.update(status="timeout" if timed_out else "error", error=why, output_tail=tail(text))
            else:
                res.pop("impl", None)
                row.update(res)
                if res.get("status") != "ok":
                    row["output_tail"] = tail(text)
            if row.get("status") == "ok" and result["ceiling_tflops"]:
                ceiling = result["ceiling_tflops"] * 1e12
                row["mfu"] = round(flops["useful"] * row["tok_s"] / ceiling, 4)
                row["mfu_2x_fwd"] = round(flops["useful_2x_fwd"] * row["tok_s"] / ceiling, 4)
                row["model_tflops"] = round(flops["useful"] * row["tok_s"] / 1e12, 1)
        result["rows"].append(row)
        print(f"    {row['name'] + (f' #{round_no}' if a.rounds > 1 else ''):<28} {row.get('status'):<12} tok/s {row.get('tok_s', '-'):>10}  "
              f"peak {row.get('peak_gib', '-')} GiB  mfu {row.get('mfu', '-')}"
              + (f"  host {row['host_launch_ms'].get('total')} ms" if row.get("host_launch_ms") else "")
              + f"  {row.get('error', '')[:200]}",
              flush=True)
        save()

    result["status"] = "done"
    save()
    print(json.dumps(result["targets"], indent=2))
    for key, t in result["targets"].items():
        if t.get("met") is None:
            print(f"target {key}: not decided ({t.get('why')})")
        else:
            print(f"target {key}: {'MET' if t['met'] else 'NOT met'} -- speed {t['speed_ratio']}x Unsloth "
                  f"(need {SPEED_TARGET}x: {'yes' if t['speed_met'] else 'no'}), "
                  f"peak {t['deftune_peak_gib']} vs {t['peer_peak_gib']} GiB "
                  f"({'yes' if t['memory_met'] else 'no'})"
                  + (f"; per round {t['round_ratios']}" if t.get("round_ratios") else ""))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
