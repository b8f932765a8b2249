"""bench/train_e2e.py's deftune rows: ``deftune train`` as a user runs it, in this process, then its timing
from metrics.jsonl and the memory peaks read after it returns. Also makes the model folder and the data.

    python bench/_deftune_train_row.py prepare --shape tiny --model-dir /tmp/deftune_bench_tiny \\
        --data /tmp/records.jsonl --records 8 --seq 64 --device cpu
    python bench/_deftune_train_row.py train --model-dir /tmp/deftune_bench_tiny --data /tmp/records.jsonl \\
        --out-dir /tmp/run --bs 2 --seq 64 --steps 3 --warmup 1 --precision 16 --device cpu [--set key=value]

``prepare`` writes ``--data`` (instruction records, each exactly ``--seq`` tokens under deftune's default
template with the folder's tokenizer, closing EOS included) and beside it ``<data>.text.jsonl``: the same
records as the text deftune trains on, without the EOS that TRL appends (the Unsloth SFT row reads it).

``train`` runs ``deftune.cli.main(["train", key=value ...])`` with only the workload's keys (see
``workload_overrides``) plus ``--set`` ones; a key the installed config does not know gives status
"skipped: unknown key". Prints one ``BENCH_JSON`` line.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import Tee, emit, host_rss_gib, make_model_folder, max_rss_gib, runner_args  # noqa: E402
from train_e2e import step_timing  # noqa: E402

# Words of the bench tokenizer's training text (_bench_common.make_model_folder): one token each there.
WORDS = ("the quick brown fox jumps over lazy dog world this is tokenizer fine tuning benchmark with random "
         "weights").split()


def workload_overrides(model_dir: str, data: str, out_dir: str, bs: int, seq: int, steps: int, precision: int,
                       device: str, log_every: int = 1) -> list[str]:
    """The keys the workload fixes, nothing else: what it trains on and for how long, the LoRA of the
    peers, scoring, the report and TensorBoard off, one metrics line per step."""
    keys = [f"model.path={model_dir}", f"data.train={data}", "data.eval=", "data.eval_fraction=0",
            f"output_dir={out_dir}", f"train.micro_batch={bs}", "train.grad_accum=1",
            f"data.max_length={seq}", f"train.max_steps={steps}", "eval.every=0", "eval.samples=0",
            "eval.final_samples=0", "monitor.report=false", "monitor.tensorboard=false",
            f"train.log_every={log_every}", "adapter.rank=16", "adapter.alpha=16",
            "adapter.targets=all-linear"]
    if precision == 4:
        keys.append("model.quantize=nf4")
    if device == "cpu":
        keys.append("device=cpu")
    return keys


# -- prepare -------------------------------------------------------------------------------------------
def fit_record(count_tokens, seq: int, rng: random.Random,
               words: tuple[str, ...] = WORDS) -> tuple[dict, int]:
    """An {"instruction", "output"} record whose tokenized length is ``seq`` (prompt about a quarter):
    the response's word count is corrected until ``count_tokens(record)`` hits it, or else the shortest
    record above it (then cut to ``seq`` by both frameworks). Returns (record, its length)."""
    prompt = " ".join(rng.choice(words) for _ in range(max(1, seq // 4 - 12)))
    n = max(1, seq - seq // 4)
    best = None
    seen = set()
    for _ in range(12):
        record = {"instruction": prompt, "output": " ".join(_words(rng.getstate(), n, words))}
        length = count_tokens(record)
        if length == seq:
            return record, length
        if length > seq and (best is None or length < best[1]):
            best = (record, length)
        seen.add(n)
        step = seq - length
        n = max(1, n + (step if abs(step) > 1 else (1 if step > 0 else -1)))
        if n in seen:
            break
    if best is None:  # always short: grow until over
        while length < seq:
            n += max(1, seq - length)
            record = {"instruction": prompt, "output": " ".join(_words(rng.getstate(), n, words))}
            length = count_tokens(record)
        best = (record, length)
    return best


def _words(state, n: int, words: tuple[str, ...]) -> list[str]:
    r = random.Random()
    r.setstate(state)
    return [r.choice(words) for _ in range(n)]


def prepare(a) -> dict:
    from transformers import AutoTokenizer

    from deftune.config import load_recipe
    from deftune.data.formats import record_to_sample
    from deftune.data.templates import render
    from deftune.data.tokenize import ensure_pad_token, tokenize_samples

    made = make_model_folder(a.shape, a.model_dir, a.device)
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    ensure_pad_token(tok)
    template = load_recipe(None).data.template  # the template a user gets

    def count_tokens(record: dict) -> int:
        sample = record_to_sample(record, "alpaca", "bench")
        examples, _ = tokenize_samples([sample], tok, template, 10**9)
        return len(examples[0])

    words = tuple(w for w in WORDS if len(tok.encode(" " + w, add_special_tokens=False)) == 1) or WORDS
    lengths = []
    os.makedirs(os.path.dirname(os.path.abspath(a.data)), exist_ok=True)
    with open(a.data, "w") as fh, open(a.data + ".text.jsonl", "w") as fh_text:
        for i in range(a.records):
            record, length = fit_record(count_tokens, a.seq, random.Random(i), words)
            lengths.append(length)
            fh.write(json.dumps(record) + "\n")
            ((prompt, response),) = render(record_to_sample(record, "alpaca", "bench"), tok, template)
            fh_text.write(json.dumps({"text": prompt + response}) + "\n")
    return {**made, "status": "ok", "data": a.data, "records": a.records, "template": template,
            "record_tokens_min": min(lengths), "record_tokens_max": max(lengths),
            "exact": min(lengths) == max(lengths) == a.seq}


# -- train ---------------------------------------------------------------------------------------------


def _recipe_view(path: str) -> dict:
    """The settings that decide speed and memory, as the run folder's recipe.yaml has them."""
    import yaml

    try:
        with open(path) as fh:
            tree = yaml.safe_load(fh)
    except OSError:
        return {}
    keep = {"model": ("dtype", "fast", "quantize", "attn_implementation", "sdpa_backend"),
            "train": ("gradient_checkpointing", "offload_activations", "checkpoint_skip",
                      "offload_mlp_layers", "keep_mlp_layers", "reuse_dequantized", "memory", "grad_accum",
                      "log_every", "lr", "schedule", "clip_grad"),
            "data": ("template", "packing", "padding_free"),
            "monitor": ("layer_grad_norms", "heatmap_every", "guard")}
    return {f"{sec}.{k}": tree.get(sec, {}).get(k) for sec, ks in keep.items() for k in ks
            if k in tree.get(sec, {})}


def memory_fields(on_cuda: bool) -> dict:
    import torch

    out = {"host_rss_peak_gib": round(max_rss_gib(), 3), "host_rss_gib": round(host_rss_gib(), 3),
           "peak_alloc_gib": None, "peak_reserved_gib": None}
    if on_cuda and torch.cuda.is_available():
        out.update(peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                   peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3),
                   gpu=torch.cuda.get_device_name())
    return out


def train(a) -> dict:
    from deftune import cli
    from deftune.config import load_recipe
    from deftune.errors import DeftuneError

    overrides = workload_overrides(a.model_dir, a.data, a.out_dir, a.bs, a.seq, a.warmup + a.steps,
                                   a.precision, a.device, a.log_every) + list(a.set)
    row = {"impl": "deftune train", "overrides": overrides, "sets": list(a.set)}
    try:
        load_recipe(None, overrides)
    except DeftuneError as exc:
        unknown = "Unknown recipe key" in str(exc) or "unknown key" in str(exc).lower()
        return {**row, "status": "skipped: unknown key" if unknown else "error: invalid recipe",
                "error": str(exc)[:600]}
    import torch

    on_cuda = a.device == "cuda"
    tee = Tee(sys.stderr)
    t0 = time.perf_counter()
    old_err, sys.stderr = sys.stderr, tee
    try:
        rc = cli.main(["train", "--no-progress", *overrides])
    except torch.OutOfMemoryError as exc:
        return {**row, "status": "oom", "error": str(exc).splitlines()[0][:300], **memory_fields(on_cuda)}
    except Exception as exc:  # noqa: BLE001 - any failure is the row's result, not the driver's end
        return {**row, "status": "error", "error": f"{type(exc).__name__}: {exc}"[:600],
                "traceback": traceback.format_exc()[-1500:], **memory_fields(on_cuda)}
    finally:
        sys.stderr = old_err
    row["main_wall_s"] = round(time.perf_counter() - t0, 2)
    row.update(memory_fields(on_cuda))
    if rc != 0:
        said = [ln for ln in "".join(tee.kept).splitlines() if ln.startswith("deftune: ")]
        error = said[-1] if said else f"deftune train returned {rc}"
        return {**row, "status": "error", "error": error[:600]}
    summary_path = os.path.join(a.out_dir, "summary.json")
    run_dir = a.out_dir
    if os.path.isfile(summary_path):
        with open(summary_path) as fh:
            summary = json.load(fh)
        run_dir = summary.get("run_dir", run_dir)
        row.update(deftune_tokens_per_s=summary.get("tokens_per_s"), train_seconds=summary.get("seconds"),
                   trainable_params=summary.get("trainable_params"))
    records = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            if line.strip():
                records.append(json.loads(line))
    steps = [r for r in records if "elapsed_s" in r]
    timing = step_timing(records, a.warmup)
    if timing["status"] == "ok" and timing["last_step"] != a.warmup + a.steps:
        timing["status"] = f"error: run ended at step {timing['last_step']} of {a.warmup + a.steps}"
    events = [r for r in records if "event" in r]
    row.update(timing, recipe=_recipe_view(os.path.join(run_dir, "recipe.yaml")))
    if steps:
        row["loss_first_last"] = [steps[0].get("loss"), steps[-1].get("loss")]
        peaks = [r["peak_mem_gib"] for r in steps if r.get("peak_mem_gib") is not None]
        if peaks:
            row["deftune_logged_peak_gib"] = max(peaks)
    if events:  # what happened besides steps (augmentation, skipped steps, the heatmap), without payloads
        row["events"] = [{k: v for k, v in e.items() if not isinstance(v, (list, dict))} for e in events[:20]]
    return row


def main() -> None:
    verb = sys.argv[1] if len(sys.argv) > 1 else ""
    if verb not in ("prepare", "train"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    if verb == "prepare":
        ap = runner_args(__doc__)
        ap.add_argument("--data", required=True)
        ap.add_argument("--records", type=int, required=True)
        a = ap.parse_args(sys.argv[2:])
        emit(prepare(a))
        return
    ap = runner_args(__doc__)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--precision", type=int, default=16, choices=[16, 4])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--log-every", type=int, default=1)
    a = ap.parse_args(sys.argv[2:])
    emit({"shape": a.shape, "bs": a.bs, "seq": a.seq, "precision": a.precision, "device": a.device,
          **train(a)})


if __name__ == "__main__":
    main()
