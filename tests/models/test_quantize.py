"""NF4 base weights (QLoRA, arXiv:2305.14314): format, kernel, layer, and a QLoRA run end to end."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_llama, tiny_recipe, write_copy_task
from torch import nn

from deftune import api
from deftune.adapters.lora.layer import LoRALinear
from deftune.adapters.lora.model import attach_lora, lora_modules
from deftune.adapters.peft_format import load_adapter, save_adapter
from deftune.config import ModelConfig
from deftune.errors import DeftuneError
from deftune.kernels.nf4 import (
    BLOCK_SIZE,
    NF4_CODE_VALUES,
    dequantize_nf4,
    dequantize_nf4_reference,
    pack_nibbles,
    unpack_nibbles,
)
from deftune.models.load import load_model
from deftune.models.quantize import (
    ABSMAX_BLOCK_SIZE,
    NF4Linear,
    dequantize_absmax,
    quantize_absmax,
    quantize_model,
    quantize_nf4,
)
from deftune.recipes import sft

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _gaussian_linear(out_features=37, in_features=53, bias=False, seed=0) -> nn.Linear:
    # 37 x 53 = 1961 weights: not a multiple of the block (64), so the padded tail is exercised.
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(linear.weight, std=0.02)
    return linear.requires_grad_(False)


# -- format -----------------------------------------------------------------------------------------
def test_code_book_is_the_normal_quantile_table():
    """NF4 = N(0,1) quantiles at 8 (positive) / 7 (negative) even steps from delta to 1/2, plus 0, each
    side scaled to +-1 (paper Sec. 3; delta = (1/32 + 1/30) / 2 away from 1)."""
    delta = 0.9677083
    positive = torch.special.ndtri(torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])
    derived = torch.cat([positive / positive.max(), negative / negative.abs().max(),
                         torch.zeros(1, dtype=torch.float64)]).sort().values
    # The paper's table was computed in float32 from a slightly rounded delta.
    torch.testing.assert_close(derived, torch.tensor(NF4_CODE_VALUES, dtype=torch.float64), atol=1e-6, rtol=0)
    assert NF4_CODE_VALUES[7] == 0.0 and NF4_CODE_VALUES[0] == -1.0 and NF4_CODE_VALUES[-1] == 1.0


def test_packing_round_trips_bit_exactly():
    codes = torch.randint(0, 16, (2 * 777,), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 777
    assert torch.equal(unpack_nibbles(packed), codes)
    # Layout: the even element in the high nibble.
    assert pack_nibbles(torch.tensor([0x1, 0xE], dtype=torch.uint8)).tolist() == [0x1E]
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(pack_nibbles(unpack_nibbles(every_byte)), every_byte)


def test_gaussian_round_trip_error_is_within_the_nf4_bound():
    w = _gaussian_linear(256, 200).weight
    q = quantize_nf4(w)
    absmax = dequantize_absmax(q["absmax_codes"], q["absmax_scale"], q["absmax_mean"])
    back = dequantize_nf4_reference(q["packed_codes"], absmax, w.numel(), torch.float32).view_as(w)
    # NF4 with blocks of 64 leaves ~9.2% relative error on Gaussian weights (16 levels); a wrong code
    # book, block or nibble order gives far more.
    assert float((back - w).norm() / w.norm()) < 0.1
    # And NF4 beats a uniform 4-bit absmax code with the same blocks (the paper's point: normal weights
    # deserve normal-quantile levels).
    blocks = w.reshape(-1, BLOCK_SIZE)
    scale = blocks.abs().amax(1, keepdim=True) / 7
    uniform = (torch.round(blocks / scale).clamp(-7, 7) * scale).view_as(w)
    assert (back - w).norm() < (uniform - w).norm()


def test_code_book_values_come_back_exactly():
    """A weight made of NF4 values times one absmax per block reconstructs bit for bit (every block has
    absmax 0.5, so the double-quantized absmax is its mean, 0.5, exactly)."""
    torch.manual_seed(0)
    n_blocks = 300  # > 256: two groups of the second level
    idx = torch.randint(0, 16, (n_blocks, BLOCK_SIZE))
    idx[:, 0] = torch.where(torch.rand(n_blocks) < 0.5, 0, 15)  # each block holds -1 or +1
    w = (torch.tensor(NF4_CODE_VALUES)[idx] * 0.5).reshape(150, 128)
    q = quantize_nf4(w)
    assert torch.equal(unpack_nibbles(q["packed_codes"]).view(n_blocks, BLOCK_SIZE), idx.to(torch.uint8))
    absmax = dequantize_absmax(q["absmax_codes"], q["absmax_scale"], q["absmax_mean"])
    back = dequantize_nf4_reference(q["packed_codes"], absmax, w.numel(), torch.float32)
    assert torch.equal(back, w.reshape(-1))


def test_double_quantized_absmax_is_within_half_a_step():
    torch.manual_seed(0)
    c = torch.rand(700) * 0.1 + 0.01
    codes, scale, mean = quantize_absmax(c)
    assert codes.dtype == torch.int8 and scale.numel() == 3 and mean.ndim == 0
    back = dequantize_absmax(codes, scale, mean)
    step = (scale / 127).repeat_interleave(256)[:700]
    assert bool(((back - c).abs() <= step / 2 + 1e-7).all())


def test_zero_weight_stays_zero():
    layer = NF4Linear.from_linear(nn.Linear(64, 3, bias=False).requires_grad_(False).apply(
        lambda m: nn.init.zeros_(m.weight) if isinstance(m, nn.Linear) else None))
    assert torch.equal(layer.dequantize(), torch.zeros(3, 64))


# -- Triton kernel ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel", [1961, 64, 1])
def test_triton_dequantize_equals_the_reference_exactly(dtype, numel):
    pytest.importorskip("triton", reason="the NF4 kernel needs triton (extra: deftune[kernels])")
    from deftune.kernels import use_triton
    from deftune.kernels._nf4_triton import dequantize_nf4_triton
    from deftune.kernels.nf4 import nf4_code_book

    torch.manual_seed(0)
    n_blocks = -(-numel // BLOCK_SIZE)
    packed = torch.randint(0, 256, (n_blocks * BLOCK_SIZE // 2,), dtype=torch.int32)
    packed = packed.to(torch.uint8).to(DEVICE)
    absmax = (torch.rand(n_blocks) * 3).to(DEVICE)
    assert use_triton(packed, absmax), "must test the kernel, not the reference against itself"
    expected = dequantize_nf4_reference(packed, absmax, numel, dtype)
    assert torch.equal(dequantize_nf4_triton(packed, absmax, numel, dtype, nf4_code_book(DEVICE), BLOCK_SIZE),
                       expected)
    assert torch.equal(dequantize_nf4(packed, absmax, numel, dtype), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("numel", [64 * 256 * 2 + 130, 64])  # crosses an absmax-scale block; one block
def test_triton_double_dequantize_equals_the_reference_exactly(dtype, numel):
    """The kernel that also undoes the double quantization (absmax from its int8 code) == dequantizing
    the absmax in PyTorch and then the codes (under the interpreter: no FMA, so bit for bit)."""
    pytest.importorskip("triton", reason="the NF4 kernel needs triton (extra: deftune[kernels])")
    from deftune.kernels import use_triton
    from deftune.kernels._nf4_triton import dequantize_nf4_double_triton
    from deftune.kernels.nf4 import dequantize_nf4_double, nf4_code_book

    torch.manual_seed(0)
    w = torch.randn(numel).to(DEVICE)
    q = quantize_nf4(w)
    args = (q["packed_codes"], q["absmax_codes"], q["absmax_scale"], q["absmax_mean"])
    assert use_triton(q["packed_codes"]), "must test the kernel, not the reference against itself"
    absmax = dequantize_absmax(q["absmax_codes"], q["absmax_scale"], q["absmax_mean"])
    expected = dequantize_nf4_reference(q["packed_codes"], absmax, numel, dtype)
    nf4 = (nf4_code_book(DEVICE), BLOCK_SIZE)
    got = dequantize_nf4_double_triton(*args, numel, dtype, ABSMAX_BLOCK_SIZE, *nf4)
    _equal_up_to_fma(got, expected, dtype)
    # Launch shapes of the bench's sweep: 512 bytes per program (one d / 127 per program) and 16384 (a
    # program spans two absmax-scale groups: d / 127 per element).
    for block in (512, 16384):
        for elements in (False, True):  # a lane per byte (pairs interleaved) or per output element
            got = dequantize_nf4_double_triton(*args, numel, dtype, ABSMAX_BLOCK_SIZE, *nf4, block=block,
                                               num_warps=2, elements=elements)
            _equal_up_to_fma(got, expected, dtype)
    _equal_up_to_fma(dequantize_nf4_double(*args, numel, dtype, ABSMAX_BLOCK_SIZE), expected, dtype)


def _equal_up_to_fma(got, expected, dtype):
    """Bit for bit on CPU (the interpreter); on a GPU the compiled kernel may fuse k * step + m into one
    FMA, which moves c' by its last float32 bit and can flip one bf16 rounding of the output."""
    if got.device.type != "cuda":
        assert torch.equal(got, expected)
        return
    rtol = 2**-7 if dtype == torch.bfloat16 else 2**-22
    torch.testing.assert_close(got.float(), expected.float(), atol=0.0, rtol=rtol)


# -- NF4Linear --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_dx_match_a_linear_holding_the_dequantized_weight(bias):
    layer = NF4Linear.from_linear(_gaussian_linear(bias=bias))
    dense = nn.Linear(53, 37, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(layer.dequantize())
        if bias:
            dense.bias.copy_(layer.bias)
    x = torch.randn(3, 5, 53)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ya = layer(xa)
    yb = dense(xb)
    torch.testing.assert_close(ya, yb, atol=1e-6, rtol=1e-6)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-6, rtol=1e-6)
    # The point of the Function: no [out, in] weight is kept for backward (it is re-dequantized).
    assert (37, 53) not in saved
    assert all(not p.requires_grad for p in layer.parameters())


def test_layer_holds_codes_not_weights():
    layer = NF4Linear.from_linear(_gaussian_linear(bias=True))
    state = layer.state_dict()
    assert set(state) == {"packed_codes", "absmax_codes", "absmax_scale", "absmax_mean", "bias"}
    assert state["packed_codes"].dtype == torch.uint8 and state["absmax_codes"].dtype == torch.int8
    # `weight` answers dtype/device/shape questions but is no matrix: one NaN element, stride 0.
    w = layer.weight
    assert w.shape == (37, 53) and w.dtype == torch.float32 and w.device == layer.device
    assert w.stride() == (0, 0) and bool(w.isnan().all())
    assert (layer.in_features, layer.out_features) == (53, 37)


def test_to_dtype_changes_compute_dtype_but_keeps_float32_scales():
    layer = NF4Linear.from_linear(_gaussian_linear(bias=True))
    scale, w32 = layer.absmax_scale.clone(), layer.dequantize()
    layer.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer.absmax_scale.dtype == torch.float32 and torch.equal(layer.absmax_scale, scale)
    assert torch.equal(layer.dequantize(), w32.to(torch.bfloat16))
    assert layer(torch.randn(2, 53, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_state_dict_loads_into_an_empty_layer():
    layer = NF4Linear.from_linear(_gaussian_linear(bias=True))
    fresh = NF4Linear(53, 37, bias=True)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.dequantize(), layer.dequantize())


def test_quantized_linears_take_about_half_a_byte_per_weight():
    layer = NF4Linear.from_linear(_gaussian_linear(512, 256))
    size = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    # 4 bits + an int8 absmax per 64 (0.125 bit) + a float32 per 64 * 256 (0.002 bit) = 0.516 bytes.
    assert 0.5 < size / (512 * 256) < 0.53


# -- model level ------------------------------------------------------------------------------------
def test_model_quantize_replaces_decoder_linears_only(tiny_llama_dir):
    model, _, _ = load_model(ModelConfig(path=str(tiny_llama_dir)))
    ids = torch.randint(5, 300, (2, 12))
    with torch.no_grad():
        reference = model(ids).logits
    stats = quantize_model(model)
    quantized = {n for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    leaves = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert quantized == {f"model.layers.{i}.{part}.{leaf}" for i in range(2) for leaf in leaves
                         for part in (("self_attn",) if leaf[0] in "qkvo" else ("mlp",))}
    assert stats.modules == 14 and type(model.lm_head) is nn.Linear
    assert stats.bytes_after < 0.55 * stats.bytes_before / 4  # float32 model: 4 bytes -> ~0.52
    with torch.no_grad():
        logits = model(ids).logits
    # Quantization noise only: 4 bits per weight moves the tiny model's logits a little.
    assert float((logits - reference).norm() / reference.norm()) < 0.2
    assert sft.count_params(model)[1] == sum(p.numel() for p in load_model(
        ModelConfig(path=str(tiny_llama_dir)))[0].parameters())


def test_full_method_with_nf4_is_refused(tmp_path):
    with pytest.raises(DeftuneError, match="model.quantize=nf4.*method full"):
        tiny_recipe(tmp_path, tmp_path / "d.jsonl", tmp_path / "run", method="full", model={
            "path": str(tmp_path), "quantize": "nf4"})
    with pytest.raises(DeftuneError, match="model.quantize must be none or nf4"):
        ModelConfig(quantize="int4")


def test_lora_over_nf4_trains_and_leaves_the_codes_alone(tiny_llama_dir, tmp_path):
    model, tokenizer, source = load_model(ModelConfig(path=str(tiny_llama_dir), quantize="nf4"))
    spec = attach_lora(model, "all-linear", "all", rank=4, alpha=8)
    assert all(isinstance(m.base_layer, NF4Linear) for m in lora_modules(model).values())
    codes = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("_codes", "_scale", "_mean"))}
    from deftune.training.monitor import UpdateTracker

    # ||W0||_F for the update heatmap comes from dequant(W), not from the NaN `weight` stand-in.
    norms = UpdateTracker(model).base_norms
    assert len(norms) == 14 and all(0 < v < float("inf") for v in norms.values())
    torch.manual_seed(0)
    ids = torch.randint(5, 300, (4, 16))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in codes.items())
    # The adapter saves in PEFT's format and loads onto a freshly quantized base with the same logits.
    save_adapter(model, spec, tmp_path / "adapter", source.name)
    fresh, _, _ = load_model(ModelConfig(path=str(tiny_llama_dir), quantize="nf4"))
    load_adapter(fresh, tmp_path / "adapter")
    model.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
        # merged (dequant(W) + s B A) == unmerged
        unmerged = model(ids).logits
        for name, module in lora_modules(model).items():
            assert isinstance(module, LoRALinear)
            from deftune.models.surgery import replace_module

            replace_module(model, name, module.merged_linear())
        torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_fused_lora_path_runs_over_an_nf4_base(tiny_llama_dir):
    """The fast path's fused LoRA Function (model.fast) takes W0 from dequantize(): same loss and
    adapter gradients as the plain LoRALinear path over the same NF4 base."""
    model, _, _ = load_model(ModelConfig(path=str(tiny_llama_dir), quantize="nf4"))
    attach_lora(model, "all-linear", "all", rank=4, alpha=8)
    torch.manual_seed(0)
    for module in lora_modules(model).values():
        nn.init.normal_(module.lora_B.weight, std=0.1)
    ids = torch.randint(5, 300, (2, 12))
    results = []
    for fused in (False, True):
        for module in lora_modules(model).values():
            module.fused = fused
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, atol=1e-5, rtol=1e-4)


def test_qlora_run_end_to_end_then_merge(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "model")
    data = write_copy_task(tmp_path / "copy.jsonl")
    recipe = tiny_recipe(model_dir, data, tmp_path / "run", model={"path": str(model_dir), "quantize": "nf4"},
                         adapter={"targets": "attention", "rank": 4, "alpha": 8}, train={"max_steps": 8})
    summary = api.train(recipe, progress=False)
    assert summary.after["eval_loss"] < summary.before["eval_loss"]
    tuned, _, _ = api.load_for_inference(summary.run_dir, "cpu")
    assert isinstance(tuned.model.layers[0].mlp.up_proj, NF4Linear)  # quantized, no adapter
    merged_dir = api.merge(summary.run_dir, str(tmp_path / "merged"))
    # The merged folder is a plain full-precision model that loads normally.
    merged, _, _ = load_model(ModelConfig(path=str(merged_dir)))
    assert not any(isinstance(m, (NF4Linear, LoRALinear)) for m in merged.modules())
    base, _, _ = load_model(ModelConfig(path=str(model_dir)))
    ids = torch.randint(5, 300, (2, 12))
    with torch.no_grad():
        a, b, c = tuned(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    assert (b - c).abs().max() > 1e-4
