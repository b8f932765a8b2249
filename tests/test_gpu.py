"""GPU tier: the same recipe on a CUDA GPU in bf16 (skipped without CUDA)."""

import json

import pytest
import torch
from conftest import tiny_recipe

from deftune.api import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_recipe_trains_in_bf16_on_cuda(tiny_llama_dir, copy_task_file, tmp_path):
    recipe = tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "run", device="auto",
                         train={"max_steps": 10})
    summary = train(recipe, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 10 and losses[-1] < losses[0]
    assert summary.after["eval_loss"] < summary.before["eval_loss"]


def test_base_is_bf16_and_adapters_fp32_on_cuda(tiny_llama_dir):
    from deftune.adapters.lora.model import attach_lora, lora_modules
    from deftune.config import ModelConfig
    from deftune.models.load import load_model

    model, _, _ = load_model(ModelConfig(path=str(tiny_llama_dir)), "cuda")
    attach_lora(model, "all-linear", "all", rank=4, alpha=8)
    layer = next(iter(lora_modules(model).values()))
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_A.weight.is_cuda


def test_dynamic_rank_and_stages_on_cuda(tiny_llama_dir, copy_task_file, tmp_path):
    recipe = tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "run", device="auto",
                         adapter={"ranks": [0, 2, 4], "rank_window": [0.1, 0.5], "sensitivity": 0.5,
                                  "stages": [{"targets": "attention", "steps": 3}, {"targets": "all-linear"}]},
                         train={"max_steps": 10},
                         eval={"every": 5, "samples": 2, "max_new_tokens": 4, "metrics": ["exact_match"]})
    summary = train(recipe, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = {r.get("event") for r in rows}
    assert {"rank_allocation", "stage"} <= events
    assert summary.steps == 10 and summary.final_trainable_params < summary.trainable_params


def test_nf4_double_dequantize_kernel_at_an_8b_mlp_shape():
    """The NF4 kernel, compiled on the card, at Llama-3-8B's MLP weight shape: equal to the
    PyTorch reference up to the FMA the compiler may use for the absmax (one bf16 rounding at most)."""
    from deftune.kernels._nf4_triton import dequantize_nf4_double_triton
    from deftune.kernels.nf4 import dequantize_nf4_reference
    from deftune.models.quantize import ABSMAX_BLOCK_SIZE, dequantize_absmax, quantize_nf4

    torch.manual_seed(0)
    w = 0.02 * torch.randn(14336, 4096, device="cuda")
    q = quantize_nf4(w)
    absmax = dequantize_absmax(q["absmax_codes"], q["absmax_scale"], q["absmax_mean"])
    want = dequantize_nf4_reference(q["packed_codes"], absmax, w.numel(), torch.bfloat16)
    args = (q["packed_codes"], q["absmax_codes"], q["absmax_scale"], q["absmax_mean"], w.numel(), torch.bfloat16,
            ABSMAX_BLOCK_SIZE)
    # The default launch and the other layout / launch shapes the race sweeps, compiled.
    for kw in ({}, {"elements": True}, {"elements": True, "block": 4096, "num_warps": 8}, {"block": 16384}):
        got = dequantize_nf4_double_triton(*args, **kw)
        torch.testing.assert_close(got.float(), want.float(), atol=0.0, rtol=2**-7, msg=str(kw))
        assert (got != want).float().mean() < 1e-3, kw  # an FMA moves a rare rounding, not the result


def test_nf4_group_kernel_equals_one_launch_per_weight_on_cuda():
    """The group kernel compiled on the card (a 1B attention block's q/k/v/o in one launch): every weight
    what its own launch gives -- the same program per block, so bit for bit unless the compiler contracts
    k * step + m into an FMA in one kernel and not the other (then a rare bf16 rounding moves)."""
    from deftune.kernels._nf4_triton import dequantize_nf4_double_group_triton, dequantize_nf4_double_triton
    from deftune.models.quantize import ABSMAX_BLOCK_SIZE, quantize_nf4

    torch.manual_seed(0)
    weights = []
    for shape in ((2048, 2048), (512, 2048), (512, 2048), (2048, 2048)):
        q = quantize_nf4(0.02 * torch.randn(*shape, device="cuda"))
        weights.append((q["packed_codes"], q["absmax_codes"], q["absmax_scale"], q["absmax_mean"],
                        shape[0] * shape[1]))
    got = dequantize_nf4_double_group_triton(weights, torch.bfloat16, ABSMAX_BLOCK_SIZE)
    for g, w in zip(got, weights):
        want = dequantize_nf4_double_triton(*w, torch.bfloat16, ABSMAX_BLOCK_SIZE)
        torch.testing.assert_close(g.float(), want.float(), atol=0.0, rtol=2**-7)
        assert (g != want).float().mean() < 1e-3


def test_fast_launches_replay_every_kernel_exactly_on_cuda(monkeypatch):
    """deftune.kernels._launch on the card: with cached launches on, the second call of each kernel (the
    replayed launch) gives bit for bit what the first (ordinary) launch gave, forward and backward; the
    launcher really replays (no fallback warning, launchers cached)."""
    import warnings

    from deftune.kernels import _launch, _nf4_triton, _rmsnorm_triton, _swiglu_triton
    from deftune.kernels.linear_ce import linear_cross_entropy
    from deftune.kernels.rmsnorm import rms_norm
    from deftune.kernels.rope import rope_qk
    from deftune.kernels.swiglu import swiglu
    from deftune.models.quantize import ABSMAX_BLOCK_SIZE, quantize_nf4

    monkeypatch.setattr(_launch, "_ENABLED", [True])
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    x = torch.randn(3, 37, 256, device=dev, dtype=bf16, requires_grad=True)
    w = torch.rand(256, device=dev, dtype=bf16)
    q = torch.randn(2, 8, 37, 64, device=dev, dtype=bf16, requires_grad=True)
    k = torch.randn(2, 2, 37, 64, device=dev, dtype=bf16, requires_grad=True)
    cos, sin = torch.rand(1, 37, 64, device=dev, dtype=bf16), torch.rand(1, 37, 64, device=dev, dtype=bf16)
    g = torch.randn(3, 37, 512, device=dev, dtype=bf16, requires_grad=True)
    u = torch.randn(3, 37, 512, device=dev, dtype=bf16, requires_grad=True)
    h = torch.randn(111, 256, device=dev, dtype=bf16, requires_grad=True)
    head = 0.02 * torch.randn(1000, 256, device=dev, dtype=bf16)
    target = torch.randint(0, 1000, (111,), device=dev)
    nf4 = quantize_nf4(0.02 * torch.randn(512, 256, device=dev))
    nf4_args = (nf4["packed_codes"], nf4["absmax_codes"], nf4["absmax_scale"], nf4["absmax_mean"], 512 * 256,
                bf16, ABSMAX_BLOCK_SIZE)

    def once():
        for t in (x, q, k, g, u, h):
            t.grad = None
        out = [rms_norm(x, w, 1e-5)]
        out += list(rope_qk(q, k, cos, sin))
        out.append(swiglu(g, u))
        out.append(linear_cross_entropy(h, head, target, reduction="sum"))
        sum(o.float().sum() for o in out).backward()
        out += [t.grad.clone() for t in (x, q, k, g, u, h)]
        out.append(_nf4_triton.dequantize_nf4_double_triton(*nf4_args))
        out += _nf4_triton.dequantize_nf4_double_group_triton([nf4_args[:5]] * 3, bf16, ABSMAX_BLOCK_SIZE)
        return [o.detach().clone() for o in out]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a launcher fallback would warn
        first, second = once(), once()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert _launch._ENABLED[0]
    assert any(callable(v) for v in _rmsnorm_triton._rms_norm_fwd.launchers.values())
    assert any(callable(v) for v in _swiglu_triton._swiglu_bwd.launchers.values())
    assert any(callable(v) for v in _nf4_triton._nf4_dequantize_group_kernel.launchers.values())
