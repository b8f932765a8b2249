"""Shared pieces of the GPU benchmarks (gpu_peers.py, long_context.py and their per-framework runners).

    python bench/_bench_common.py make --shape llama-1b --dir /tmp/m1b   # random-init model + tokenizer
    python bench/_bench_common.py ceiling                                # bf16 matmul ceiling of this card
    python bench/_bench_common.py digest                                 # sha1 of src/deftune (results name it)

Each runner prints exactly one result line ``BENCH_JSON {...}`` on stdout; the driver reads that line
and ignores everything else a framework prints.

Useful FLOPs per token (the MFU numerator; the same formula for every framework, from the shape only,
so 4-bit packing and LoRA wrappers do not change it):

    P      = parameters that enter a matmul: per layer q, k, v, o, gate, up, down, plus the LM head
             (vocab x d; counted once even when tied to the embedding, whose lookup is not a matmul).
             LoRA's own matmuls (r=16, ~0.5% of P) are left out.
    fwd    = 2 P + attention, attention = 2 L seq d_attn  (QK^T and PV: 2 matmuls x 2 flops x seq x d_attn,
             halved for the causal mask; d_attn = heads x head_dim)
    bwd    = activation gradients only (the base weights are frozen, no weight gradient, no recompute):
             2 P for the linears (dX = dY W), 2 x attention for the attention core (dQ, dK, dV and dP are
             all activation gradients: 4 matmuls against the forward's 2)
    useful = fwd + bwd = 4 P + 3 attention
    MFU    = useful x tokens/s / ceiling, ceiling = best bf16 8192^3 matmul rate measured on the card.

``mfu_2x_fwd`` (useful = 2 fwd = 4 P + 2 attention, counting the attention backward like a linear's) is
reported beside it; on these shapes at seq 2048 the two differ by under 4%.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time

MARK = "BENCH_JSON "

SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                     rope_theta=500000.0, max_position_embeddings=8192),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                     rope_theta=500000.0, max_position_embeddings=8192),
    # CPU smoke tests only.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False,
                 rope_theta=10000.0, max_position_embeddings=8192),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def emit(record: dict) -> None:
    print(MARK + json.dumps(record), flush=True)


def parse_result(stdout: str) -> dict | None:
    """The last ``BENCH_JSON`` line of a runner's stdout, or None."""
    found = None
    for line in stdout.splitlines():
        if line.startswith(MARK):
            try:
                found = json.loads(line[len(MARK):])
            except json.JSONDecodeError:
                pass
    return found


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def runner_args(description: str, device: bool = True):
    """The argument parser every per-framework runner starts from: the workload (model folder, shape,
    batch, sequence, LoRA rank, timed and warm-up steps) and, unless CUDA-only, the device."""
    import argparse

    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    if device:
        ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    return ap


def labels_loss_step(model, params, opt):
    """One training step as the HF+PEFT anchors take it: the model's own loss (labels = inputs), backward,
    clip 1.0, optimizer step. Returns ``step(x) -> loss``."""
    import torch

    def step(x):
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    return step


def timed_steps(step, vocab: int, bs: int, seq: int, device: str, warmup: int, steps: int) -> dict:
    """Run ``step(x) -> loss`` on ``warmup + steps`` batches of random tokens (seeded, the same for every
    framework) and return the timing fields of a result row: status ok with median step, tokens/s, first
    step and first/last loss, or status oom with the steps done. Peak memory is counted from here."""
    import torch

    on_cuda = device == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(1)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    try:
        for _ in range(warmup + steps):
            x = torch.randint(0, vocab, (bs, seq), device=device, generator=gen)
            sync()
            t = time.perf_counter()
            losses.append(step(x))
            sync()
            times.append(time.perf_counter() - t)
    except torch.OutOfMemoryError as exc:
        return {"status": "oom", "error": str(exc).splitlines()[0][:300], "steps_done": len(times)}
    step_s = median(times[warmup:])
    row = {"status": "ok", "step_s": round(step_s, 4), "tok_s": round(bs * seq / step_s, 1),
           "first_step_s": round(times[0], 2), "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
           "timed_steps_s": [round(t_, 4) for t_ in times[warmup:]]}
    if on_cuda:
        # Read here, before any profiled steps; the runners prefer this figure to a later reading.
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    if on_cuda and os.environ.get(PROFILE_ENV):
        # After the timed steps (and their peak), so the profiler's own overhead changes neither figure.
        try:
            row["profile"] = profile_steps(step, vocab, bs, seq, gen, os.environ[PROFILE_ENV])
        except Exception as exc:  # a profiler failure must not cost the row its timing
            row["profile"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return row


PROFILE_ENV = "BENCH_PROFILE_OUT"

# GPU kernels by family (first match wins), to compare where two frameworks spend a step.
KERNEL_FAMILIES = (
    ("memcpy", ("memcpy", "memset")),
    ("attention", ("flash", "fmha", "sdpa", "attention", "attn")),
    ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "sm90_", "splitk", "cublas")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "reduce", "index", "scatter", "gather",
                     "fill", "copy", "cat", "foreach", "fused_adam", "multi_tensor", "norm")),
)


def kernel_family(name: str) -> str:
    low = name.lower()
    for family, keys in KERNEL_FAMILIES:
        if any(k in low for k in keys):
            return family
    return "other (Triton and custom)"


def _cprofile_step(step, x, top: int = 45) -> dict:
    """One step under cProfile: the Python functions with the most own time and the most cumulative time
    (host overhead hunting: which call of the step's code spends the host's time, own or below it)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    step(x)
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for (fname, line, func), (cc, nc, tt, ct, _callers) in stats.stats.items():
        rows.append((tt, ct, nc, f"{os.path.basename(os.path.dirname(fname))}/{os.path.basename(fname)}:{line}"
                     f"({func})"))
    def table(key) -> list:
        return [{"fn": r[3][:150], "tottime_ms": round(r[0] * 1e3, 2), "cumtime_ms": round(r[1] * 1e3, 2),
                 "calls": r[2]} for r in sorted(rows, key=key)[:top]]

    return {"by_own_time": table(lambda r: -r[0]), "by_cumulative_time": table(lambda r: -r[1])}


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")


def gemm_sites(events, n: int, top: int = 30) -> list[dict]:
    """The matrix multiplies of ``n`` profiled steps grouped by (op, input shapes, enclosing op): device
    time and calls per step and the kernel cuBLAS picked, so a kernel in the family table can be traced to
    the line that launched it (e.g. a rank-16 GEMM that runs at a fraction of the card's bandwidth)."""
    sites: dict[tuple, dict] = {}
    for evt in events:
        if evt.name not in GEMM_OPS:
            continue
        parent = getattr(evt, "cpu_parent", None)
        while parent is not None and parent.name in GEMM_OPS + ("aten::matmul", "aten::linear"):
            parent = getattr(parent, "cpu_parent", None)
        key = (evt.name, str(getattr(evt, "input_shapes", ""))[:160], parent.name[:80] if parent else "")
        site = sites.setdefault(key, {"op": key[0], "shapes": key[1], "inside": key[2], "calls_per_step": 0.0,
                                      "device_ms_per_step": 0.0, "kernel": ""})
        site["calls_per_step"] += 1 / n
        dev_us = getattr(evt, "device_time_total", None)
        if dev_us is None:  # torch before device_time_total
            dev_us = getattr(evt, "cuda_time_total", 0)
        site["device_ms_per_step"] += (dev_us or 0) / n / 1e3
        kernels = getattr(evt, "kernels", None) or []
        if kernels and not site["kernel"]:
            site["kernel"] = kernels[0].name[:100]
    out = sorted(sites.values(), key=lambda r: -r["device_ms_per_step"])[:top]
    for site in out:
        site["device_ms_per_step"] = round(site["device_ms_per_step"], 3)
        site["calls_per_step"] = round(site["calls_per_step"], 2)
    return out


def idle_gaps(activities: list[tuple], launches: dict, n: int, min_gap_us: float = 20.0, top: int = 15) -> dict:
    """Where the busiest GPU stream (the compute stream) waits, per step.

    ``activities``: (name, stream, start_ns, end_ns, correlation) of every kernel, memcpy and memset;
    ``launches``: correlation -> start_ns of the host call that launched it. A gap longer than
    ``min_gap_us`` is *host late* when the work after it was launched only after the stream had gone idle
    (the host is the bottleneck there: Python, launches, a sync) and *waiting* when it had been queued
    already (a dependency: an event on another stream, e.g. an offload copy), and *unknown* when the
    profiler did not record the launching call (not counted as waiting: that would hide a host-bound
    stretch). Sums are per step; the largest gaps name the work on either side."""
    by_stream: dict = {}
    for act in activities:
        by_stream.setdefault(act[1], []).append(act)
    if not by_stream:
        return {}
    stream = max(by_stream, key=lambda s: sum(end - start for _, _, start, end, _ in by_stream[s]))
    acts = sorted(by_stream[stream], key=lambda a: a[2])
    busy = sum(end - start for _, _, start, end, _ in acts)
    late_ns = wait_ns = unknown_ns = 0
    gaps, prev_end, prev_name = [], acts[0][3], acts[0][0]
    for name, _, start, end, corr in acts[1:]:
        gap = start - prev_end
        if gap > min_gap_us * 1e3:
            launched = launches.get(corr)
            late = None if launched is None else launched > prev_end
            if late is None:
                unknown_ns += gap
            elif late:
                late_ns += gap
            else:
                wait_ns += gap
            gaps.append({"gap_us": round(gap / 1e3, 1), "host_late": late, "before": prev_name[:70],
                         "after": name[:70]})
        if end > prev_end:
            prev_end, prev_name = end, name
    gaps.sort(key=lambda g: -g["gap_us"])
    span = acts[-1][3] - acts[0][2]
    return {"stream": stream, "span_ms_per_step": round(span / n / 1e6, 3),
            "busy_ms_per_step": round(busy / n / 1e6, 3),
            "idle_ms_per_step": round((span - busy) / n / 1e6, 3),
            "idle_host_late_ms_per_step": round(late_ns / n / 1e6, 3),
            "idle_waiting_ms_per_step": round(wait_ns / n / 1e6, 3),
            "idle_launch_unknown_ms_per_step": round(unknown_ns / n / 1e6, 3),
            "gaps_over_min_per_step": round(len(gaps) / n, 1), "min_gap_us": min_gap_us,
            "largest_gaps": gaps[:top]}


def _kineto_idle(prof, n: int) -> dict:
    """:func:`idle_gaps` from a torch.profiler run (CUDA activities and the runtime calls that launched them)."""
    from torch.autograd import DeviceType

    activities, launches = [], {}
    for evt in prof.profiler.kineto_results.events():
        if evt.device_type() == DeviceType.CUDA:
            corr = evt.linked_correlation_id() or evt.correlation_id()
            activities.append((evt.name(), evt.device_resource_id(), evt.start_ns(), evt.end_ns(), corr))
        elif evt.name().startswith(("cudaLaunch", "cuLaunch", "cudaMemcpy", "cudaMemset")):
            launches[evt.correlation_id()] = evt.start_ns()
    return idle_gaps(activities, launches, n)


def profile_steps(step, vocab: int, bs: int, seq: int, gen, out_path: str, n: int = 2,
                  device: str = "cuda") -> dict:
    """``n`` more steps under torch.profiler: GPU kernel time per step by kernel and by family
    (gemm / attention / elementwise / memcpy / other), and the GPU-busy share of the wall time (a step
    that leaves the GPU idle is launch- or sync-bound). Writes the full list to ``out_path``; returns
    the summary for the result row."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    xs = [torch.randint(0, vocab, (bs, seq), device=device, generator=gen) for _ in range(n)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    stacks = bool(os.environ.get("BENCH_PROFILE_STACK"))
    # Input shapes, not Python stacks: with_stack trips a decoding bug in some torch builds' profilers.
    with profile(activities=acts, record_shapes=stacks) as prof:
        for x in xs:
            step(x)
        sync()
    wall_ms = (time.perf_counter() - t) * 1e3 / n
    kernels = {}
    for evt in prof.key_averages():
        # Only device-side events: CPU ops also carry the device time of the kernels they launch.
        if getattr(evt, "device_type", None) != DeviceType.CUDA:
            continue
        dev_us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if dev_us > 0:
            kernels[evt.key] = (dev_us / n / 1e3, evt.count // n)
    # The host side: which ops cost the most CPU time, and the CUDA runtime calls that block the host
    # (a synchronize, a synchronous copy or a pinned/device allocation drains the launch queue).
    cpu_ops, blocking = [], {}
    for evt in prof.key_averages():
        if getattr(evt, "device_type", None) == DeviceType.CUDA:
            continue
        cpu_ops.append((evt.key, evt.self_cpu_time_total / n / 1e3, evt.count // n))
        low = evt.key.lower()
        if any(k in low for k in ("synchronize", "hostalloc", "cudamalloc", "cudafree", "cudamemcpy ",
                                  "mallochost", "freehost")) or low in ("cudamemcpy", "cudamemcpyasync"):
            blocking[evt.key] = {"calls_per_step": evt.count / n,
                                 "ms_per_step": round(evt.self_cpu_time_total / n / 1e3, 3)}
    cpu_ops.sort(key=lambda r: -r[1])
    busy = sum(ms for ms, _ in kernels.values())
    families: dict[str, float] = {}
    for name, (ms, _) in kernels.items():
        fam = kernel_family(name)
        families[fam] = families.get(fam, 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])
    full = {"wall_ms_per_step": round(wall_ms, 1), "gpu_busy_ms_per_step": round(busy, 1),
            "families_ms": {k: round(v, 1) for k, v in sorted(families.items(), key=lambda kv: -kv[1])},
            "kernels": [{"kernel": k[:200], "family": kernel_family(k), "ms_per_step": round(ms, 3),
                         "calls_per_step": c} for k, (ms, c) in top],
            "kernel_launches_per_step": sum(c for _, c in kernels.values()),
            "cpu_ops": [{"op": k[:160], "self_cpu_ms_per_step": round(ms, 3), "calls_per_step": c}
                        for k, ms, c in cpu_ops[:60]],
            "blocking_runtime_calls": blocking}
    if device == "cuda":
        try:
            full["idle"] = _kineto_idle(prof, n)
        except Exception as exc:  # a profiler build without these accessors: the rest still counts
            full["idle"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    if stacks:
        # Which copies: copy/clone ops grouped by their input shapes, by device time.
        sites = []
        for evt in prof.key_averages(group_by_input_shape=True):
            if evt.key in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::index"):
                dev = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
                sites.append({"op": evt.key, "calls_per_step": evt.count / n, "device_ms_per_step":
                              round(dev / n / 1e3, 3), "shapes": str(evt.input_shapes)[:200]})
        sites.sort(key=lambda r: -r["device_ms_per_step"])
        full["copy_sites"] = sites[:25]
        # Who calls cudaMemcpyAsync (a device-to-device memcpy runs on a copy engine that the offload's
        # host copies keep busy, and the compute stream waits for it): the chain of enclosing ops.
        callers: dict[str, int] = {}
        for evt in prof.events():
            if evt.name not in ("cudaMemcpyAsync", "cudaMemcpy"):
                continue
            chain, parent = [], getattr(evt, "cpu_parent", None)
            while parent is not None and len(chain) < 4:
                chain.append(parent.name[:60])
                parent = getattr(parent, "cpu_parent", None)
            key = " <- ".join(chain) or "(no parent op)"
            callers[key] = callers.get(key, 0) + 1
        full["memcpy_callers"] = sorted(([k, c / n] for k, c in callers.items()), key=lambda r: -r[1])[:20]
        full["gemm_sites"] = gemm_sites(prof.events(), n)
    if os.environ.get("BENCH_CPROFILE"):
        full["cprofile_top"] = _cprofile_step(step, xs[-1])
    with open(out_path, "w") as f:
        json.dump(full, f, indent=1)
    return {k: full[k] for k in ("wall_ms_per_step", "gpu_busy_ms_per_step", "families_ms",
                                 "kernel_launches_per_step", "blocking_runtime_calls") if k in full} | {
        "idle": {k: v for k, v in full.get("idle", {}).items() if k != "largest_gaps"},
        "top10": [[k["kernel"][:80], k["ms_per_step"]] for k in full["kernels"][:10]]}


def flops_per_token(shape: str, seq: int) -> dict:
    s = SHAPES[shape]
    L, d, ff, vocab = s["num_hidden_layers"], s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    head_dim = d // s["num_attention_heads"]
    d_attn = head_dim * s["num_attention_heads"]
    kvd = head_dim * s["num_key_value_heads"]
    p = L * (d * d_attn * 2 + 2 * d * kvd + 3 * d * ff) + vocab * d
    attn = 2 * L * seq * d_attn
    fwd = 2 * p + attn
    return {"matmul_params": p, "attention_fwd": attn, "fwd": fwd,
            "useful": 2 * (2 * p) + 3 * attn, "useful_2x_fwd": 2 * fwd}


def versions() -> dict:
    """Installed versions, read from package metadata (importing unsloth would patch transformers)."""
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "triton", "liger_kernel", "unsloth", "unsloth_zoo",
                 "bitsandbytes", "torchao", "accelerate"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        import subprocess

        out["deftune_git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                            text=True, timeout=10).stdout.strip()
        # A copied tree (the GPU host's) can carry stale git metadata: say when the sources differ from it.
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        if dirty:
            out["deftune_git"] += "+modified"
    except Exception:
        pass
    out["deftune_src_sha1"] = src_digest()
    # The GPU host's copy of the checkout keeps the git metadata of the session's start: the caller names
    # the commit it sent (DEFTUNE_GIT=$(git rev-parse --short HEAD) where the checkout lives), and
    # deftune_src_sha1 (`python bench/_bench_common.py digest` there) confirms it.
    if os.environ.get("DEFTUNE_GIT"):
        out["deftune_git_from_git_metadata"] = out.get("deftune_git", "")
        out["deftune_git"] = os.environ["DEFTUNE_GIT"]
    return out


def src_digest() -> str:
    """sha1 over deftune's source files (path + content), to match a result to a commit when git
    metadata cannot be trusted: ``python bench/_bench_common.py digest`` at that commit prints the same."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "src" / "deftune"
    h = hashlib.sha1()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def host_rss_gib() -> float:
    """Current resident set size of this process (GiB), from /proc (Linux)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return float("nan")


def max_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def make_model_folder(shape: str, folder: str, device: str = "cuda", max_position_embeddings: int = 0) -> dict:
    """A random-init Llama of ``shape`` (bf16 safetensors, 5 GB shards) plus a small BPE tokenizer.

    Skipped when ``folder`` was already made for the same shape (several runs share one): a marker file,
    written last, records the shape, so a save cut short is redone."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    s = dict(SHAPES[shape])
    if max_position_embeddings:
        s["max_position_embeddings"] = max_position_embeddings
    marker = os.path.join(folder, "deftune_bench_shape.json")
    if os.path.isfile(marker):
        with open(marker) as fh:
            if json.load(fh) == s:
                return {"made": folder, "shape": shape, "reused": True}
    t0 = time.time()
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(600, s["vocab_size"]),
                                  special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["The quick brown fox jumps over the lazy dog.", "Hello world, this is a tokenizer.",
                            "LoRA fine-tuning benchmark with random weights."] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.model_max_length = s["max_position_embeddings"]
    cfg = LlamaConfig(**s, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                      pad_token_id=fast.pad_token_id, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB", safe_serialization=True)
    fast.save_pretrained(folder)
    del model
    with open(marker, "w") as fh:
        json.dump(s, fh)
    return {"made": folder, "shape": shape, "reused": False, "secs": round(time.time() - t0, 1)}


def matmul_ceiling(n: int = 8192, repeats: int = 5, iters: int = 10) -> dict:
    """Best bf16 n^3 matmul rate on the current CUDA device (TFLOP/s), best of ``repeats`` timings."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b, out=out)
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / iters)
    props = torch.cuda.get_device_properties(0)
    return {"card": torch.cuda.get_device_name(0), "total_gib": round(props.total_memory / 2**30, 2),
            "ceiling_tflops": round(2 * n**3 / best / 1e12, 1), "ceiling_n": n}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["make", "ceiling", "digest"])
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--dir", default="")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-position-embeddings", type=int, default=0)
    a = ap.parse_args()
    if a.what == "make":
        emit(make_model_folder(a.shape, a.dir, a.device, a.max_position_embeddings))
    elif a.what == "digest":
        print(src_digest())
    else:
        emit(matmul_ceiling())


if __name__ == "__main__":
    main()


class Tee(io.TextIOBase):
    """A stream that writes through to ``stream`` and keeps what was written (a row's own error lines)."""

    def __init__(self, stream):
        self.stream, self.kept = stream, []

    def write(self, text):
        self.stream.write(text)
        self.kept.append(text)
        return len(text)

    def flush(self):
        self.stream.flush()
