"""Per-kernel race on the GPU: deftune's Triton kernels vs Liger-Kernel's vs the PyTorch reference.

    PYTHONPATH=/tmp/site:$PWD/src python bench/kernels_vs_liger.py --out bench/results/kernels_vs_liger.json

(``/tmp/site`` holds the peer wheels: ../shared/bench/get_peer_wheels.sh .peers, then
``pip install --no-index --no-deps --target /tmp/site .peers/*.whl``.) Liger is *run* through its public
API only, never read. For each op, at Llama-3.2-1B (batch 8) and Llama-3.1-8B (batch 4) shapes, seq 2048,
bf16: forward + backward time (median of 20 after 5 warm-ups, CUDA events) and peak memory above the
inputs. The frozen-weight cases are the ones LoRA training runs (RMSNorm weight and LM head frozen).
The issue asks to use Liger's kernel where it is the fastest: the JSON's "fastest" per op says which.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

SHAPES = {
    "llama-1b": dict(tokens=8 * 2048, hidden=2048, inter=8192, heads=32, kv=8, head_dim=64, vocab=128256),
    "llama-8b": dict(tokens=4 * 2048, hidden=4096, inter=14336, heads=32, kv=8, head_dim=128, vocab=128256),
}


def timed(fn, warmup: int = 5, iters: int = 20) -> tuple[float, float]:
    """Median ms of ``fn()`` (forward + backward) and its peak extra GiB."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**30


def race(name: str, candidates: dict) -> dict:
    row = {"op": name}
    for impl, fn in candidates.items():
        try:
            ms, gib = timed(fn)
            row[impl] = {"ms": round(ms, 3), "peak_extra_gib": round(gib, 3)}
        except Exception as exc:  # a peer missing or failing must not stop the race
            row[impl] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        torch.cuda.empty_cache()
    ok = {k: v["ms"] for k, v in row.items() if isinstance(v, dict) and "ms" in v}
    row["fastest"] = min(ok, key=ok.get) if ok else None
    return row


def ops_for(shape: dict) -> list[dict]:
    from deftune.kernels.linear_ce import linear_cross_entropy, linear_cross_entropy_reference
    from deftune.kernels.rmsnorm import rms_norm, rms_norm_reference
    from deftune.kernels.rope import rope_qk, rope_qk_reference
    from deftune.kernels.swiglu import swiglu, swiglu_reference

    try:
        import liger_kernel.transformers as liger
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except Exception:  # recorded per op as an error below
        liger, LigerSiLUMulFunction = None, None
    dev, bf16 = "cuda", torch.bfloat16
    n, h, inter = shape["tokens"], shape["hidden"], shape["inter"]
    rows = []

    # RMSNorm, frozen weight (LoRA training): only dX.
    x = torch.randn(n, h, device=dev, dtype=bf16, requires_grad=True)
    w = torch.rand(h, device=dev, dtype=bf16)
    g = torch.randn(n, h, device=dev, dtype=bf16)
    liger_norm = liger.LigerRMSNorm(h, eps=1e-5).to(dev, bf16).requires_grad_(False) if liger else None

    def fb(f):
        def run():
            x.grad = None
            f().backward(g)

        return run

    rows.append(
        race(
            "rms_norm (frozen weight)",
            {
                "deftune": fb(lambda: rms_norm(x, w, 1e-5)),
                "liger": fb(lambda: liger_norm(x)),
                "torch": fb(lambda: rms_norm_reference(x, w, 1e-5)),
            },
        )
    )

    # RoPE on Q and K.
    b, t = n // 2048, 2048
    q = torch.randn(b, shape["heads"], t, shape["head_dim"], device=dev, dtype=bf16, requires_grad=True)
    k = torch.randn(b, shape["kv"], t, shape["head_dim"], device=dev, dtype=bf16, requires_grad=True)
    cos = torch.rand(b, t, shape["head_dim"], device=dev, dtype=bf16)
    sin = torch.rand(b, t, shape["head_dim"], device=dev, dtype=bf16)
    gq, gk = torch.randn_like(q), torch.randn_like(k)

    def rope_run(f):
        def run():
            q.grad = k.grad = None
            qo, ko = f(q, k, cos, sin)
            torch.autograd.backward([qo, ko], [gq, gk])

        return run

    rows.append(
        race(
            "rope_qk",
            {
                "deftune": rope_run(rope_qk),
                "liger": rope_run(lambda a, b_, c, s: liger.liger_rotary_pos_emb(a, b_, c, s)),
                "torch": rope_run(rope_qk_reference),
            },
        )
    )

    # SwiGLU.
    gate = torch.randn(n, inter, device=dev, dtype=bf16, requires_grad=True)
    up = torch.randn(n, inter, device=dev, dtype=bf16, requires_grad=True)
    gg = torch.randn(n, inter, device=dev, dtype=bf16)

    def glu_run(f):
        def run():
            gate.grad = up.grad = None
            f(gate, up).backward(gg)

        return run

    rows.append(
        race(
            "swiglu",
            {
                "deftune": glu_run(swiglu),
                "liger": glu_run(lambda a, b_: LigerSiLUMulFunction.apply(a, b_)),
                "torch": glu_run(swiglu_reference),
            },
        )
    )

    # LM head + cross-entropy, frozen head.
    hid = torch.randn(n, h, device=dev, dtype=bf16, requires_grad=True)
    head = torch.randn(shape["vocab"], h, device=dev, dtype=bf16) * 0.02
    target = torch.randint(0, shape["vocab"], (n,), device=dev)
    liger_ce = liger.LigerFusedLinearCrossEntropyLoss() if liger else None

    def ce_run(f):
        def run():
            hid.grad = None
            f().backward()

        return run

    rows.append(
        race(
            "linear_cross_entropy (frozen head)",
            {
                "deftune": ce_run(lambda: linear_cross_entropy(hid, head, target, reduction="mean")),
                "liger": ce_run(lambda: liger_ce(head, hid, target)),
                "torch": ce_run(lambda: linear_cross_entropy_reference(hid, head, target, reduction="mean")),
            },
        )
    )
    rows.append(nf4_race(shape))
    return rows


def nf4_race(shape: dict, dev: str = "cuda", race_fn=None) -> dict:
    """NF4 dequantization of one MLP weight [inter, hidden] to bf16 (QLoRA's per-use cost; no backward):
    deftune's Triton kernel (and a sweep of its launch shape), bitsandbytes' CUDA kernel (its own NF4 +
    double-quant format) and torchao's NF4Tensor, so the 4-bit path is chosen by measurement. Each
    quantizes the same weight."""
    from deftune.kernels import _nf4_triton
    from deftune.models.quantize import ABSMAX_BLOCK_SIZE, NF4Linear

    bf16 = torch.bfloat16
    w = torch.randn(shape["inter"], shape["hidden"], device=dev, dtype=bf16) * 0.02
    base = torch.nn.Linear(shape["hidden"], shape["inter"], bias=False, device=dev, dtype=bf16)
    with torch.no_grad():
        base.weight.copy_(w)
    layer = NF4Linear.from_linear(base)
    args = (layer.packed_codes, layer.absmax_codes, layer.absmax_scale, layer.absmax_mean,
            w.numel(), bf16, ABSMAX_BLOCK_SIZE)
    candidates = {
        "deftune": lambda: _nf4_triton.dequantize_nf4_double_triton(*args),
    }
    # The kernel's launch shape (bytes per program x warps), swept: the default is one point of it.
    for elements in (False, True):
        for block in (512, 1024, 2048, 4096, 8192):
            for warps in (2, 4, 8):
                candidates[f"deftune{' elem' if elements else ''} b{block} w{warps}"] = (
                    lambda b=block, w=warps, e=elements: _nf4_triton.dequantize_nf4_double_triton(
                        *args, block=b, num_warps=w, elements=e))
    try:
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        candidates["bitsandbytes"] = lambda: bnbf.dequantize_4bit(packed, state)
    except Exception as exc:
        candidates["bitsandbytes"] = _raiser(exc)
    try:
        try:  # torchao >= 0.18 moved NF4Tensor
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
        except ImportError:
            from torchao.dtypes.nf4tensor import to_nf4

        nf4 = to_nf4(w, 64, 256)
        candidates["torchao"] = lambda: nf4.get_original_weight()
    except Exception as exc:
        candidates["torchao"] = _raiser(exc)
    return (race_fn or race)(f"nf4 dequantize [{shape['inter']}, {shape['hidden']}] -> bf16", candidates)


def _raiser(exc: Exception):
    def run():
        raise exc

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama-1b,llama-8b")
    ap.add_argument("--out", default="bench/results/kernels_vs_liger.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernels_vs_liger.py needs a CUDA GPU")
    import transformers
    from _bench_common import versions as bench_versions

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    versions.update({k: v for k, v in bench_versions().items() if k.startswith("deftune")})
    try:
        import importlib.metadata as md

        versions["liger_kernel"] = md.version("liger_kernel")
        versions["triton"] = md.version("triton")
    except Exception:
        pass
    result = {
        "benchmark": "kernels_vs_liger: forward+backward per op, bf16",
        "date": time.strftime("%Y-%m-%d"),
        "card": torch.cuda.get_device_name(0),
        "versions": versions,
        "shapes": {},
    }
    for name in args.shapes.split(","):
        result["shapes"][name] = ops_for(SHAPES[name])
        for row in result["shapes"][name]:
            print(name, json.dumps(row), flush=True)
    out = Path(os.environ["OUT"]) / Path(args.out).name if os.environ.get("OUT") else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
