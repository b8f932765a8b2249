"""Step time and peak memory of deftune's own training path on a random-init model folder.

    python bench/_deftune_step.py --model-dir /tmp/deftune_bench_llama-1b --shape llama-1b --bs 8 --seq 2048 \
        --fast 1 --quantize none --offload 1
    # CPU smoke test (makes the tiny folder first):
    python bench/_deftune_step.py --make --model-dir /tmp/deftune_bench_tiny --shape tiny --device cpu --bs 2 --seq 64

Builds the model the way ``deftune.train`` does -- ``load_recipe`` overrides, ``models.load.load_model``,
``recipes.sft.prepare_model``, gradient checkpointing as in ``deftune.train`` -- then times steps made of deftune's
loss (``train.loss.response_loss_sum`` under the trainer's autocast, labels = input ids), deftune's
optimizer (``train.optim.build_optimizer``: fused AdamW on CUDA) and clipping at 1.0.
3 warm-up + N timed steps; prints one ``BENCH_JSON`` line (median step, tokens/s, peak GiB).

Recipe keys that other work adds (``model.fast``, ``model.quantize``, ``train.offload_activations``) are
passed only when the installed config has them; the line records which were used and which were missing.
A row asked for a feature whose key is missing reports status "unsupported" instead of silently running
the plain bf16 path.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from statistics import median

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import emit, make_model_folder, runner_args, timed_steps  # noqa: E402


def recipe_overrides(model_dir: str, device: str, fast: bool, quantize: str, offload: bool, rank: int = 16,
                     seq: int = 2048):
    """``(overrides, used, missing)``: the key=value list for ``load_recipe`` given the installed schema."""
    from deftune.config import field_docs

    keys = set(field_docs())
    overrides = [f"model={model_dir}", f"device={device}", "method=lora", "model.attn_implementation=sdpa",
                 "adapter.targets=all-linear", "adapter.layers=all", f"adapter.rank={rank}",
                 f"adapter.alpha={rank}", "adapter.dropout=0", "adapter.ranks=[]", "adapter.stages=[]",
                 "train.gradient_checkpointing=true", "train.clip_grad=1.0", "train.weight_decay=0.0",
                 "train.lr=1e-4", "train.warmup=0", "train.schedule=constant", "train.grad_accum=1",
                 f"data.max_length={seq}"]
    wanted = {"model.fast": "true" if fast else "false", "model.quantize": quantize,
              "train.offload_activations": "true" if offload else "false"}
    used, missing = {}, []
    for key, value in wanted.items():
        if key in keys:
            overrides.append(f"{key}={value}")
            used[key] = value
        else:
            missing.append(key)
    return overrides, used, missing


def unsupported_reason(fast: bool, quantize: str, missing: list[str]) -> str:
    if fast and "model.fast" in missing:
        return "deftune config has no model.fast key: the fast path is not wired in this checkout"
    if quantize != "none" and "model.quantize" in missing:
        return "deftune config has no model.quantize key: 4-bit loading is not wired in this checkout"
    return ""


def module_census(model) -> dict:
    """Class names of the modules, and where each class's forward comes from (a kernel patch shows here)."""
    counts = Counter(type(m).__name__ for m in model.modules())
    origin = {}
    for m in model.modules():
        name = type(m).__name__
        if name not in origin:
            fwd = getattr(m, "forward", None)
            fn = getattr(fwd, "__func__", fwd)
            origin[name] = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"
    return {"counts": dict(counts.most_common()), "forward_of": origin}


def build(model_dir: str, device: str, fast: bool, quantize: str, offload: bool, rank: int = 16,
          seq: int = 2048, extra: tuple[str, ...] = ()) -> dict:
    """Model, optimizer and recipe built through deftune's library path (``extra``: more key=value
    overrides). Returns a dict."""
    import torch

    from deftune.config import load_recipe
    from deftune.models.load import load_model, resolve_device
    from deftune.recipes import sft
    from deftune.training.loop import seed_everything
    from deftune.training.optim import build_optimizer

    overrides, used, missing = recipe_overrides(model_dir, device, fast, quantize, offload, rank, seq)
    overrides += list(extra)
    used.update(dict(x.split("=", 1) for x in extra))
    info = {"recipe_keys_used": used, "recipe_keys_missing": missing}
    reason = unsupported_reason(fast, quantize, missing)
    if reason:
        return {**info, "status": "unsupported", "error": reason}
    recipe = load_recipe(None, overrides)
    dev = resolve_device(recipe.device)
    seed_everything(recipe.train.seed)
    t0 = time.perf_counter()
    model, _tokenizer, _source = load_model(recipe.model, dev)
    seed_everything(recipe.train.seed)
    sft.prepare_model(recipe, model, dev)
    # Checkpointing exactly as api.train sets it up (offloading, when on, checkpoints the layers itself).
    offload = bool(getattr(recipe.train, "offload_activations", False))
    checkpointing = sft.enable_checkpointing(recipe, model)
    model.config.use_cache = False
    info["checkpointing"] = "offloaded (deftune)" if offload else ("transformers" if checkpointing else "none")
    info["fast_path"] = _ensure_fast_path(model, recipe) if fast else None
    model.train()
    trainable, total = sft.count_params(model)
    optimizer, scheduler = build_optimizer(model, recipe.train, total_steps=1000)
    info.update(model=model, optimizer=optimizer, scheduler=scheduler, recipe=recipe, device=dev,
                load_s=round(time.perf_counter() - t0, 1), trainable_m=round(trainable / 1e6, 2),
                params_m=round(total / 1e6, 1), census=module_census(model),
                param_dtypes=dict(Counter(str(p.dtype) for p in model.parameters())))
    if dev.type == "cuda":
        info["after_load_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    return info


def _ensure_fast_path(model, recipe) -> dict:
    """What patched the model: deftune's api (when it applies ``model.fast`` itself) or, when the api does
    not call it yet, this runner through deftune's own ``kernels.patch.apply_fast_path``."""
    try:
        from deftune.fast_path.patch import apply_fast_path, fast_counts, is_fast
    except ImportError as exc:
        return {"applied_by": "nobody", "error": f"deftune.fast_path.patch missing: {exc}"}
    if is_fast(model):
        return {"applied_by": "deftune api", "counts": fast_counts(model)}
    lines: list[str] = []
    counts = apply_fast_path(model, log=lines.append)
    return {"applied_by": "bench runner via deftune.fast_path.patch.apply_fast_path (api did not apply it)",
            "counts": counts, "log": lines}


def train_step(built: dict, input_ids) -> float:
    """One optimizer step of deftune's loss on ``input_ids`` (labels = inputs); returns the mean loss."""
    import torch

    from deftune.training.loop import autocast_context
    from deftune.training.loss import response_loss_sum

    model, optimizer, scheduler = built["model"], built["optimizer"], built["scheduler"]
    batch = {"input_ids": input_ids, "labels": input_ids}
    # Host clock at the end of each phase's launches (nothing here waits for the GPU before the final
    # float(loss), except the labelled positions' nonzero at the start, when the GPU is idle anyway). A
    # step whose launches take about as long as the step is bound by the host, not by the GPU.
    t0 = time.perf_counter()
    with autocast_context(built["device"]):
        loss_sum, n = response_loss_sum(model, batch)
    loss = loss_sum / n
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, built["recipe"].train.clip_grad)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    built.setdefault("host_s", []).append((t1 - t0, t2 - t1, t3 - t2))
    return float(loss.detach())


def host_launch_ms(samples: list, skip: int) -> dict:
    """Median host time per phase (forward + loss, backward, clip + optimizer) over the timed steps, in ms."""
    rows = samples[skip:]
    if not rows:
        return {}
    out = {name: round(median(r[i] for r in rows) * 1e3, 2)
           for i, name in enumerate(("forward", "backward", "optimizer"))}
    out["total"] = round(median(sum(r) for r in rows) * 1e3, 2)
    return out


def phase_peaks(built: dict, input_ids) -> dict:
    """One more step with the peak-memory counter reset between forward (incl. the fused loss), backward
    and the optimizer step: which phase sets the row's peak (GiB)."""
    import torch

    from deftune.training.loop import autocast_context
    from deftune.training.loss import response_loss_sum

    model, optimizer = built["model"], built["optimizer"]
    out = {}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with autocast_context(built["device"]):
        loss_sum, n = response_loss_sum(model, {"input_ids": input_ids, "labels": input_ids})
    torch.cuda.synchronize()
    out["forward"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    torch.cuda.reset_peak_memory_stats()
    (loss_sum / n).backward()
    torch.cuda.synchronize()
    out["backward"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    torch.cuda.reset_peak_memory_stats()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, built["recipe"].train.clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    out["optimizer"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def main() -> None:
    ap = runner_args(__doc__)
    ap.add_argument("--make", action="store_true", help="create the random-init model folder first (if absent)")
    ap.add_argument("--fast", type=int, default=1)
    ap.add_argument("--quantize", default="none", choices=["none", "nf4"])
    ap.add_argument("--offload", type=int, default=0)
    ap.add_argument("--phase-peaks", type=int, default=0, help="after timing, one step with per-phase peaks")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="more recipe overrides, e.g. train.offload_mlp_layers=8 (repeatable)")
    a = ap.parse_args()
    import torch

    name = f"deftune {'fast' if a.fast else 'plain'}" + (" nf4" if a.quantize != "none" else "")
    row = {"impl": name, "shape": a.shape, "bs": a.bs, "seq": a.seq, "rank": a.rank, "fast": bool(a.fast),
           "quantize": a.quantize, "offload_requested": bool(a.offload), "device": a.device}
    if a.device == "cuda" and not torch.cuda.is_available():
        emit({**row, "status": "error", "error": "no CUDA GPU visible (torch.cuda.is_available() is False)"})
        return
    if a.make:
        row["make"] = make_model_folder(a.shape, a.model_dir, a.device)
    built = build(a.model_dir, a.device, bool(a.fast), a.quantize, bool(a.offload), a.rank, a.seq,
                  tuple(a.set))
    if "model" not in built:
        emit({**row, **built})
        return
    on_cuda = a.device == "cuda"
    timing = timed_steps(lambda x: train_step(built, x), built["model"].config.vocab_size, a.bs, a.seq,
                         a.device, a.warmup, a.steps)
    meta = _meta(built, on_cuda)
    # Timed steps only (the profiled steps run after them and are not counted).
    meta["host_launch_ms"] = host_launch_ms(built.get("host_s", [])[:a.warmup + a.steps], a.warmup)
    if a.phase_peaks and on_cuda and timing.get("status") == "ok":
        import torch

        x = torch.randint(0, built["model"].config.vocab_size, (a.bs, a.seq), device=a.device)
        meta["phase_peak_gib"] = phase_peaks(built, x)
    emit({**row, **meta, **timing})


def _meta(built: dict, on_cuda: bool) -> dict:
    import torch

    keys = ("recipe_keys_used", "recipe_keys_missing", "fast_path", "checkpointing", "load_s", "trainable_m",
            "params_m", "census", "param_dtypes")
    out = {k: built[k] for k in keys if k in built}
    if on_cuda:
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out["after_load_gib"] = built.get("after_load_gib")
        out["gpu"] = torch.cuda.get_device_name()
    return out


if __name__ == "__main__":
    main()
