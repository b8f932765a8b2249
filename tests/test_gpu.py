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
    from deftune.kernels.nf4 import BLOCK_SIZE, dequantize_nf4_reference, nf4_code_book
    from deftune.models.quantize import ABSMAX_BLOCK_SIZE, dequantize_absmax, quantize_nf4

    torch.manual_seed(0)
    w = 0.02 * torch.randn(14336, 4096, device="cuda")
    q = quantize_nf4(w)
    absmax = dequantize_absmax(q["absmax_codes"], q["absmax_scale"], q["absmax_mean"])
    want = dequantize_nf4_reference(q["packed_codes"], absmax, w.numel(), torch.bfloat16)
    args = (q["packed_codes"], q["absmax_codes"], q["absmax_scale"], q["absmax_mean"], w.numel(), torch.bfloat16,
            ABSMAX_BLOCK_SIZE, nf4_code_book("cuda"), BLOCK_SIZE)
    # The default launch and the other layout / launch shapes the race sweeps, compiled.
    for kw in ({}, {"elements": True}, {"elements": True, "block": 4096, "num_warps": 8}, {"block": 16384}):
        got = dequantize_nf4_double_triton(*args, **kw)
        torch.testing.assert_close(got.float(), want.float(), atol=0.0, rtol=2**-7, msg=str(kw))
        assert (got != want).float().mean() < 1e-3, kw  # an FMA moves a rare rounding, not the result
