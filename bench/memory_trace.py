"""What is alive at the memory peak of one deftune training step: a CPU replay of the GPU fast path.

    python bench/memory_trace.py [--stash 0] [--checkpoint offload|transformers|none] [--top 25]

On a GPU ``max_memory_allocated`` says how high a step goes, not what is there. This replays one LoRA step
of a small Llama-shaped model on the CPU with the Triton kernels running in ``TRITON_INTERPRET=1`` (the
same autograd Functions and saved tensors as on the GPU), records every allocation and free with torch's
profiler (``profile_memory``), rebuilds the live set over time and prints it at the peak, each block
with the chain of ops that allocated it. Sizes are also given in units of one hidden-state tensor
(tokens x hidden x dtype size), which carry over to real shapes.

Host copies of ``train.offload_activations`` / ``train.offload_mlp_layers`` are pinned host memory on a
GPU; here they are plain CPU clones, so allocations made while an ``OffloadedTensor`` is being built are
left out of the tally. Weights, LoRA parameters and optimizer state exist before the profiled step and
are not counted: the figure is the step's growth over its starting point.

Caveat: Triton's interpreter keeps the tensor arguments of a kernel's latest launch referenced until that
kernel runs again, so up to one launch's tensors per kernel (e.g. gate, up and the product of the last
SwiGLU) can show as live here when on a GPU they are already freed. Read the list with that in mind.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")


def build(a):
    import torch
    import transformers

    from deftune.adapters.lora.model import attach_lora
    from deftune.fast_path import offload
    from deftune.fast_path.patch import apply_fast_path

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=a.hidden, intermediate_size=a.inter, num_hidden_layers=a.layers, num_attention_heads=a.heads,
        num_key_value_heads=a.kv, vocab_size=a.vocab, max_position_embeddings=a.seq, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(config)
    for p in model.parameters():
        p.requires_grad_(False)
    attach_lora(model, "all-linear", "all", rank=16, alpha=16, dropout=0.0)
    apply_fast_path(model, log=lambda _: None)
    if a.checkpoint == "offload":
        offload.wrap_decoder_layers(model, mlp_layers=a.stash)
    elif a.checkpoint == "transformers":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=896, help="3.5 x hidden, as Llama-3-8B")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--stash", type=int, default=0, help="train.offload_mlp_layers")
    ap.add_argument("--checkpoint", default="offload", choices=["offload", "transformers", "none"])
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--phase", default="", choices=["", "forward", "backward", "optimizer"],
                    help="the peak within this phase only")
    ap.add_argument("--detail", type=float, default=0.0,
                    help="also list every live block of at least this many hidden-state tensors, oldest first")
    a = ap.parse_args()

    import torch
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function

    from deftune.fast_path import offload
    from deftune.training.loss import response_loss_sum

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    model = build(a)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    real_init = offload.OffloadedTensor.__init__

    def labelled_init(self, *args, **kwargs):
        with record_function("deftune::host_copy"):
            real_init(self, *args, **kwargs)

    offload.OffloadedTensor.__init__ = labelled_init

    def step(x):
        with record_function("phase::forward"):
            loss, n = response_loss_sum(model, {"input_ids": x, "labels": x})
        with record_function("phase::backward"):
            (loss / n).backward()
        with record_function("phase::optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, a.vocab, (a.bs, a.seq), generator=gen)
    step(x)  # optimizer state exists from here on, as in a measured GPU step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        step(x)

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    def chain(node) -> list[str]:
        names = []
        node = node.parent
        while node is not None:
            names.append(node.name)
            node = node.parent
        return names[::-1]

    events = sorted((n for n in walk(prof.profiler.kineto_results.experimental_event_tree())
                     if n.tag == _EventType.Allocation), key=lambda n: n.start_time_ns)
    live: dict[int, tuple[int, list[str]]] = {}
    host: set[int] = set()
    total = peak = 0
    peak_live: dict = {}
    peak_chain: list[str] = []
    for node in events:
        f = node.extra_fields
        names = chain(node)
        if f.alloc_size > 0:
            if "deftune::host_copy" in names:
                host.add(f.ptr)
                continue
            if f.ptr in live:  # a free the profiler did not report: the address is being reused
                total -= live.pop(f.ptr)[0]
            live[f.ptr] = (f.alloc_size, names, node.start_time_ns)
            total += f.alloc_size
            if total > peak and (not a.phase or f"phase::{a.phase}" in names):
                peak, peak_live, peak_chain = total, dict(live), names
        else:
            if f.ptr in host:
                host.discard(f.ptr)
                continue
            if f.ptr in live:
                total -= live.pop(f.ptr)[0]

    unit = a.bs * a.seq * a.hidden * 4  # one float32 hidden-state tensor
    phase = next((n for n in peak_chain if n.startswith("phase::")), "?")
    print(f"config: layers {a.layers}, hidden {a.hidden}, intermediate {a.inter}, heads {a.heads}/{a.kv}, "
          f"vocab {a.vocab}, tokens {a.bs * a.seq}, checkpoint {a.checkpoint}, stash {a.stash}")
    print(f"peak growth over the step's start: {peak / 2**20:.2f} MiB = {peak / unit:.2f} hidden-state tensors, "
          f"during {phase}, at {' > '.join(n for n in peak_chain if not n.startswith('phase::'))[-240:]}")
    groups: dict = collections.defaultdict(lambda: [0, 0])
    for size, names, _t in peak_live.values():
        inner = [n for n in names if not n.startswith("phase::")]
        ph = next((n for n in names if n.startswith("phase::")), "?")
        key = (ph, " > ".join(inner[-3:]))
        groups[key][0] += size
        groups[key][1] += 1
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])[: a.top]
    print(f"{'x hidden':>9} {'MiB':>8} {'n':>3}  allocated in")
    for (ph, where), (size, count) in rows:
        print(f"{size / unit:9.2f} {size / 2**20:8.2f} {count:3d}  {ph}: {where}")
    if a.detail:
        print("live blocks at the peak, oldest first:")
        for size, names, _t in sorted(peak_live.values(), key=lambda v: v[2]):
            if size >= a.detail * unit:
                print(f"{size / unit:9.2f}  {' > '.join(names)[-300:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

