"""Host-side cost of one fast-path training step, measured on the CPU with tiny tensors.

At the 1B shape an H200 step is bound by the host (bench/results/gpu_peers_llama-1b_hostlaunch.json):
the Python, autograd and dispatcher work that queues the kernels takes about as long as the kernels. That
work does not depend on the tensor sizes, so a model with the 1B layer count (16) but tiny widths, run on
the CPU where each op then costs next to nothing, times it: forward + loss and backward wall time per
step, and how many aten ops and autograd Functions one step dispatches. The figures are a proxy for the
GPU host time (no CUDA launches here), fit to compare two versions of the code on one machine, never to
quote as GPU figures.

    python bench/host_overhead.py --out bench/results/host_overhead_cpu.json [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import versions


def build(layers: int, skip: int, quantize: bool):
    import torch
    import transformers

    from deftune.adapters.lora.model import attach_lora, lora_modules
    from deftune.fast_path import offload
    from deftune.fast_path.patch import apply_fast_path

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=256,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=1,
                                      max_position_embeddings=256, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(config)
    if quantize:
        from deftune.models.quantize import quantize_model

        quantize_model(model)
    attach_lora(model, "all-linear", "all", rank=16, alpha=16, dropout=0.0)
    for module in lora_modules(model).values():
        torch.nn.init.normal_(module.lora_B.weight, std=0.02)
    apply_fast_path(model, log=lambda _: None)
    offload.wrap_decoder_layers(model, keep_top=skip)
    model.train()
    model.config.use_cache = False
    return model


def step(model, optimizer, batch, phases: list | None = None, mark=lambda phase: None) -> None:
    import torch

    from deftune.training.loss import response_loss_sum

    mark("forward")
    t0 = time.perf_counter()
    loss_sum, n = response_loss_sum(model, batch)
    loss = loss_sum / n
    t1 = time.perf_counter()
    mark("backward")
    loss.backward()
    t2 = time.perf_counter()
    mark("optimizer")
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    if phases is not None:
        phases.append((t1 - t0, t2 - t1, t3 - t2))


def count_ops(model, optimizer, batch) -> dict:
    """aten ops (every dispatch, views included) and autograd Function calls of one step, per phase."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    phase = ["forward"]
    ops: dict[str, Counter] = {"forward": Counter(), "backward": Counter(), "optimizer": Counter()}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops[phase[0]][str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    functions: Counter = Counter()
    real_apply = torch.autograd.Function.apply.__func__

    def counted(cls, *args, **kwargs):
        functions[cls.__name__] += 1
        return real_apply(cls, *args, **kwargs)

    torch.autograd.Function.apply = classmethod(counted)
    try:
        with Count():
            step(model, optimizer, batch, mark=lambda name: phase.__setitem__(0, name))
    finally:
        torch.autograd.Function.apply = classmethod(real_apply)
    return {"aten_ops": {name: sum(c.values()) for name, c in ops.items()},
            "aten_top": {name: dict(c.most_common(10)) for name, c in ops.items()},
            "function_calls": sum(functions.values()), "functions": dict(functions)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16, help="decoder layers (16: Llama-3.2-1B)")
    ap.add_argument("--skip", type=int, default=2, help="train.checkpoint_skip (top layers not checkpointed)")
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--nf4", action="store_true", help="4-bit base weights (deftune NF4)")
    ap.add_argument("--out", help="write the result row as JSON here")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # the host path, not intra-op parallelism, is what is timed
    model = build(a.layers, a.skip, a.nf4)
    # Fused, as deftune's GPU runs use it (one kernel, no per-parameter host work).
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    ids = torch.randint(3, 256, (a.bs, a.seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids.clone()}
    phases: list = []
    for _ in range(a.warmup + a.steps):
        step(model, optimizer, batch, phases)
    timed = phases[a.warmup:]
    row = {
        "what": "host cost of one fast-path step on the CPU (tiny widths; a proxy for GPU host time)",
        "date": time.strftime("%Y-%m-%d"), "versions": versions(), "cpu": platform.processor() or
        platform.machine(), "layers": a.layers, "checkpoint_skip": a.skip, "bs": a.bs, "seq": a.seq,
        "nf4": a.nf4, "steps": a.steps,
        "forward_ms": round(median(p[0] for p in timed) * 1e3, 3),
        "backward_ms": round(median(p[1] for p in timed) * 1e3, 3),
        "optimizer_ms": round(median(p[2] for p in timed) * 1e3, 3),
        "total_ms": round(median(sum(p) for p in timed) * 1e3, 3),
        **count_ops(model, optimizer, batch),
    }
    text = json.dumps(row, indent=1)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
