"""Long-context memory of one deftune training step: Llama-3.1-8B shape, 4-bit, batch 1, card capped at 80 GB.

    PYTHONPATH=/tmp/site:$PWD/src python bench/long_context.py --model-dir /tmp/deftune_bench_llama-8b \\
        --lengths 32768,65536,131072 [--cap-gb 80] [--out bench/results/long_context.json] [--budget-s 150]
    PYTHONPATH=$PWD/src python bench/long_context.py --shape tiny --device cpu --lengths 256,512,1024 \\
        --model-dir /tmp/deftune_bench_tiny --out /tmp/lc.json                              # CPU smoke

deftune's own path (bench/_deftune_step.py's ``build``): model.quantize=nf4, model.fast=true,
train.offload_activations=true (when the installed config has those keys; the JSON lists what was used),
LoRA r=16 on all linear layers, deftune's loss with labels = inputs, fused AdamW, clip 1.0;
``--mlp-tile N`` adds train.mlp_tile_tokens=N (each MLP over N-token checkpointed tiles).

The card is capped with ``torch.cuda.set_per_process_memory_fraction(cap / total)``, cap = ``--cap-gb`` x 1e9
bytes (80 GB = 74.5 GiB, a little under the 79.2 GiB an 80 GB card offers, so the cap is conservative).
Lengths run in increasing order, one optimizer step each; the first out-of-memory ends the series and is
recorded. Per length: peak GPU memory (torch.cuda.max_memory_allocated, and max_memory_reserved), peak host
RSS sampled every 20 ms during the step, and the step time. Then ``peak_gpu = a + b x length`` is fitted by
least squares over the lengths that ran, and the longest length whose fitted peak stays within the cap is
reported as a PROJECTION (not a measurement), beside the longest length actually run.
With ``--extend-step N`` the series continues past ``--lengths`` in steps of N while the time budget allows
(the next step's time is estimated from the last one, quadratic in length for the attention).

The model folder is the random-init one gpu_peers.py makes (made here if missing); a sibling folder
``<model-dir>_long`` links its weights and raises max_position_embeddings to the longest length.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _bench_common import SHAPES, host_rss_gib, make_model_folder, max_rss_gib, versions  # noqa: E402


class RssSampler:
    """Peak resident set size of this process while the ``with`` block runs (sampled every 20 ms)."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak, self._stop = every, host_rss_gib(), threading.Event()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, host_rss_gib())

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, host_rss_gib())


def long_folder(model_dir: str, max_len: int) -> str:
    """``<model_dir>_long``: links to the weights, config with max_position_embeddings >= max_len."""
    src = Path(model_dir)
    dst = Path(f"{model_dir.rstrip('/')}_long")
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.name != "config.json" and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())
    cfg = json.loads((src / "config.json").read_text())
    cfg["max_position_embeddings"] = max(int(cfg.get("max_position_embeddings", 0)), max_len)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return str(dst)


def host_total_gib() -> float:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        return float("inf")


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least-squares (a, b) of y = a + b x; None with fewer than two distinct x."""
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def projection(rows: list[dict], key: str, cap_gib: float) -> dict | None:
    ok = [r for r in rows if r.get("status") == "ok" and r.get(key) is not None]
    line = fit_line([r["length"] for r in ok], [r[key] for r in ok])
    if line is None:
        return None
    a, b = line
    out = {"fit": f"{key} = {a:.3f} GiB + {b * 1e3:.5f} GiB per 1k tokens", "a_gib": round(a, 4),
           "b_gib_per_token": b, "points": len(ok), "cap_gib": round(cap_gib, 2)}
    if b > 0:
        out["projected_max_length"] = int((cap_gib - a) / b) // 1024 * 1024
    out["label"] = "PROJECTION from the fitted line, not a measured run"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="/tmp/deftune_bench_llama-8b")
    ap.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    ap.add_argument("--lengths", default="32768,65536,131072")
    ap.add_argument("--cap-gb", type=float, default=80.0)
    ap.add_argument("--out", default=str(HERE / "results" / "long_context.json"))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--fast", type=int, default=1)
    ap.add_argument("--quantize", default="nf4", choices=["none", "nf4"])
    ap.add_argument("--offload", type=int, default=1)
    ap.add_argument("--mlp-tile", type=int, default=0, help="train.mlp_tile_tokens (0 = off)")
    ap.add_argument("--extend-step", type=int, default=0, help="continue past --lengths in steps of N tokens")
    ap.add_argument("--max-len", type=int, default=524288)
    ap.add_argument("--budget-s", type=float, default=0, help="stop before a step that would not fit (0 = none)")
    a = ap.parse_args()
    t_start = time.time()
    deadline = t_start + a.budget_s if a.budget_s else float("inf")
    lengths = sorted(int(x) for x in a.lengths.split(",") if x.strip())
    top = max(lengths + ([a.max_len] if a.extend_step else []))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import torch

    result = {"benchmark": "long_context: peak memory of one deftune training step vs sequence length",
              "command": " ".join(["python", "bench/long_context.py"] + sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "card": None, "versions": versions(),
              "workload": {"shape": a.shape, "batch": 1, "lora": "r=16 alpha=16 dropout=0, all linear layers",
                           "fast": bool(a.fast), "quantize": a.quantize, "offload_requested": bool(a.offload), "mlp_tile_tokens": a.mlp_tile,
                           "cap_gb": a.cap_gb, "cap_bytes": int(a.cap_gb * 1e9),
                           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")},
              "rows": [], "notes": []}

    def save() -> None:
        cap_gib = a.cap_gb * 1e9 / 2**30
        ran = [r["length"] for r in result["rows"] if r.get("status") == "ok"]
        result["longest_length_run"] = max(ran) if ran else None
        ooms = [r["length"] for r in result["rows"] if r.get("status") == "oom"]
        result["first_oom_length"] = ooms[0] if ooms else None
        result["projection"] = projection(result["rows"], "peak_gpu_gib", cap_gib)
        result["projection_reserved"] = projection(result["rows"], "peak_reserved_gib", cap_gib)
        result["elapsed_s"] = round(time.time() - t_start, 1)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)

    on_cuda = a.device == "cuda"
    if on_cuda and not torch.cuda.is_available():
        msg = "No CUDA GPU visible (torch.cuda.is_available() is False): this benchmark needs one."
        print(msg, file=sys.stderr)
        result["status"] = "no_cuda"
        result["notes"].append(msg)
        save()
        return 2
    if on_cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        fraction = min(1.0, a.cap_gb * 1e9 / total)
        torch.cuda.set_per_process_memory_fraction(fraction)
        result.update(card=torch.cuda.get_device_name(0), card_total_gib=round(total / 2**30, 2),
                      memory_fraction=round(fraction, 4), host_total_gib=round(host_total_gib(), 1))
    else:
        result["card"] = "cpu (smoke test)"
        if a.offload:
            a.offload = 0
            result["notes"].append("cpu smoke test: train.offload_activations needs CUDA, run without it")

    made = make_model_folder(a.shape, a.model_dir, a.device)
    folder = long_folder(a.model_dir, top)
    result["model_folder"] = {**made, "long_folder": folder}
    print(f"model folder {folder} ({made})", flush=True)

    import _deftune_step

    t0 = time.perf_counter()
    extra = (f"train.mlp_tile_tokens={a.mlp_tile}",) if a.mlp_tile else ()
    built = _deftune_step.build(folder, a.device, bool(a.fast), a.quantize, bool(a.offload), 16, top, extra)
    if "model" not in built:
        result.update(status=built.get("status", "error"), error=built.get("error"))
        save()
        print(result["error"], file=sys.stderr)
        return 1
    result["setup"] = {k: built.get(k) for k in ("recipe_keys_used", "recipe_keys_missing", "fast_path",
                                                  "checkpointing", "trainable_m", "params_m", "param_dtypes")}
    result["setup"]["load_s"] = round(time.perf_counter() - t0, 1)
    if on_cuda:
        result["setup"]["after_load_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
    save()

    vocab = built["model"].config.vocab_size
    gen = torch.Generator(device=a.device).manual_seed(1)
    queue = list(lengths)
    last = None
    while queue:
        length = queue.pop(0)
        if last and deadline < float("inf"):
            estimate = last["step_s"] * (length / last["length"]) ** 2 * 1.2 + 5
            if time.time() + estimate > deadline:
                result["notes"].append(f"stopped before {length} tokens: estimated {estimate:.0f}s, "
                                       f"{deadline - time.time():.0f}s of the budget left")
                break
        if last:
            # Host memory grows with length (pinned offload buffers): extrapolate from the rows run.
            ok = [r for r in result["rows"] if r.get("status") == "ok"]
            line = fit_line([r["length"] for r in ok], [r["peak_host_rss_gib"] for r in ok])
            need = (line[0] + line[1] * length if line
                    else last["peak_host_rss_gib"] * length / last["length"])
            if need > 0.85 * host_total_gib():
                result["notes"].append(f"stopped before {length} tokens: host memory would reach ~{need:.0f} GiB "
                                       f"of {host_total_gib():.0f} GiB (pinned offload buffers grow with length)")
                break
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        row = {"length": length}
        print(f"[{time.time() - t_start:5.0f}s] length {length} ...", flush=True)
        rss, x = RssSampler(), None
        try:
            x = torch.randint(0, vocab, (1, length), device=a.device, generator=gen)
            with rss:
                if on_cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                loss = _deftune_step.train_step(built, x)
                if on_cuda:
                    torch.cuda.synchronize()
                row.update(status="ok", step_s=round(time.perf_counter() - t, 2), loss=round(loss, 4))
        except torch.OutOfMemoryError as exc:
            row.update(status="oom", error=str(exc).splitlines()[0][:400])
            built["optimizer"].zero_grad(set_to_none=True)
        del x
        row["peak_host_rss_gib"] = round(rss.peak, 2)
        row["max_rss_gib_so_far"] = round(max_rss_gib(), 2)
        if on_cuda:
            row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        result["rows"].append(row)
        print(f"    {row}", flush=True)
        save()
        if row["status"] != "ok":
            break
        last = row
        if not queue and a.extend_step and length + a.extend_step <= a.max_len:
            queue.append(length + a.extend_step)

    result["status"] = "done"
    save()
    p = result["projection"]
    print(f"longest length run: {result['longest_length_run']}, first OOM: {result['first_oom_length']}")
    if p and "projected_max_length" in p:
        print(f"PROJECTION (fitted, not run): max length within {a.cap_gb:g} GB = {p['projected_max_length']} "
              f"tokens ({p['fit']})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
