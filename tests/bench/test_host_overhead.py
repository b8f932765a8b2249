"""bench/host_overhead.py: the per-step counts it reports (the timings are not asserted: benchmarks only)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import host_overhead


def test_counts_one_step_of_the_patched_checkpointed_model():
    """Two layers, both checkpointed: the forward runs q/k/v, o and gate/up as adapter groups (3 per layer)
    and every base GEMM as FrozenAddmm (7 per layer); the recompute runs them again except down's GEMM
    (early stop), and each MLP's SwiGLU + down-adapter Function once per pass."""
    model = host_overhead.build(layers=2, skip=0, quantize=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    host_overhead.step(model, optimizer, batch)  # warm: the counted step must not be the first
    counts = host_overhead.count_ops(model, optimizer, batch)
    lora = {"LoRAGroupDeltaFunction": 2 * 3 + 2 * 3, "FrozenAddmmFunction": 2 * 7 + 2 * 6,
            "SwiGLULoRADeltaFunction": 2 + 2}
    assert {name: counts["functions"].get(name) for name in lora} == lora
    # Under the Triton interpreter the norm, RoPE and loss kernels are Functions too (else PyTorch code).
    assert counts["function_calls"] == sum(counts["functions"].values()) >= sum(lora.values())
    assert set(counts["aten_ops"]) == {"forward", "backward", "optimizer"}
    assert counts["aten_ops"]["forward"] > 0 and counts["aten_ops"]["backward"] > counts["aten_ops"]["forward"]
    # The Function counter is taken off again.
    assert torch.autograd.Function.apply.__func__.__name__ != "counted"
