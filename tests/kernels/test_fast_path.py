"""The fast path (``model.fast``), the fused LoRA linear and activation offloading, each against the
plain path on tiny seeded models of every supported family.

On CPU these tests run the kernels' PyTorch references: they check the *wiring* (what is patched, that
the patched model computes what the plain one does, that training and saving are unchanged); the
kernels' own tests check Triton against the references. On a GPU the Triton kernels run.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import make_tiny_tokenizer, tiny_recipe

from deftune import api
from deftune.adapters.lora.layer import LoRALinear
from deftune.adapters.lora.model import attach_lora, lora_modules
from deftune.errors import DeftuneError
from deftune.kernels import offload, patch
from deftune.kernels.lora_linear import lora_linear
from deftune.kernels.patch import apply_fast_path
from deftune.train.loss import response_loss_sum

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DENSE = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 128, "vocab_size": 96,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}
FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]
# 2 layers: input + post-attention norm per layer and the final norm; Qwen3 adds q_norm and k_norm.
RMS_NORMS = {"llama": 5, "qwen2": 5, "qwen3": 9, "mistral": 5}


@pytest.fixture(autouse=True)
def _reference_path_on_cpu(monkeypatch):
    """On CPU the fast path must run the PyTorch references (the CPU path users get), not Triton's
    interpreter (which the test session turns on for the kernel tests), also far too slow for training."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    yield


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(family: str, **extra):
    T = transformers
    if family == "llama":
        return T.LlamaConfig(**DENSE, **extra)
    if family == "qwen2":
        return T.Qwen2Config(**DENSE, **extra)
    if family == "qwen3":
        return T.Qwen3Config(**DENSE, head_dim=8, **extra)
    if family == "mistral":
        return T.MistralConfig(**DENSE, **extra)
    if family == "gemma2":
        return T.Gemma2Config(**DENSE, head_dim=8, **extra)
    raise ValueError(family)


def _lora_model(family: str, dropout: float = 0.0, seed: int = 0):
    """A seeded tiny model with LoRA on every projection and a non-zero update (B random)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(family))
    attach_lora(model, "all-linear", "all", rank=4, alpha=8, dropout=dropout)
    for module in lora_modules(model).values():
        torch.nn.init.normal_(module.lora_B.weight, std=0.1)
    return model.to(DEVICE)


def _batch(vocab: int = 96, rows: int = 3, length: int = 13):
    ids = torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :5] = -100  # prompt tokens
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # one padded row
    labels[0, -3:] = -100
    return {k: v.to(DEVICE) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def _assert_same_step(reference, other, batch, rel, atol, rtol):
    """``other`` gives ``reference``'s loss (within ``rel``) and every trainable gradient (atol/rtol)."""
    loss_r, _, grads_r = _loss_and_grads(reference, batch)
    loss_o, _, grads_o = _loss_and_grads(other, batch)
    assert loss_o == pytest.approx(loss_r, rel=rel)
    for name in grads_r:
        torch.testing.assert_close(grads_o[name], grads_r[name], atol=atol, rtol=rtol, msg=name)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss, n = response_loss_sum(model, batch)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), n, grads


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_patch_counts_per_family(family):
    lines = []
    counts = apply_fast_path(_lora_model(family), log=lines.append)
    assert counts == {"rms_norm": RMS_NORMS[family], "rope": 2, "swiglu": 2, "lora_linear": 14,
                      "linear_cross_entropy": 1}
    assert lines == [f"fast path: rms_norm {RMS_NORMS[family]} modules, rope 2 attention modules, swiglu 2 "
                     f"MLPs, lora_linear 14 projections, linear_cross_entropy 1 head"]


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_logits_loss_and_grads_match_plain(family):
    plain = _lora_model(family)
    fast = copy.deepcopy(plain)
    apply_fast_path(fast, log=lambda _: None)
    batch = _batch()
    with torch.no_grad():
        # use_cache=False: with a cache the attention hands over to transformers' own forward.
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        torch.testing.assert_close(fast(**kw).logits, plain(**kw).logits, atol=1e-5, rtol=1e-5)
    loss_p, n_p, grads_p = _loss_and_grads(plain, batch)
    loss_f, n_f, grads_f = _loss_and_grads(fast, batch)
    assert n_f == n_p
    assert loss_f == pytest.approx(loss_p, rel=1e-5)
    assert grads_f.keys() == grads_p.keys() and len(grads_p) == 28
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], atol=1e-5, rtol=1e-4, msg=name)


def test_fast_path_really_calls_every_kernel(monkeypatch):
    """Guard against a patch that silently leaves the model's own code running."""
    calls = {"rms_norm": 0, "rope_qk": 0, "swiglu": 0, "swiglu_lora_linear": 0, "linear_cross_entropy": 0,
             "lora_group": 0, "lora_linear": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    for name in ("rms_norm", "rope_qk", "swiglu", "swiglu_lora_linear", "linear_cross_entropy", "lora_group"):
        monkeypatch.setattr(patch, name, counting(name, getattr(patch, name)))
    import deftune.kernels.lora_linear as lora_linear_module

    monkeypatch.setattr(lora_linear_module, "lora_linear", counting("lora_linear", lora_linear))
    model = _lora_model("qwen3")
    apply_fast_path(model, log=lambda _: None)
    response_loss_sum(model, _batch())
    # A LoRA down projection takes the product inside its own Function (swiglu_lora_linear); q/k/v and
    # gate/up, which read the same input, run as one group each (lora_group); o_proj alone.
    assert calls == {"rms_norm": 9, "rope_qk": 2, "swiglu": 0, "swiglu_lora_linear": 2, "linear_cross_entropy": 1,
                     "lora_group": 4, "lora_linear": 2}


def test_fast_path_generation_matches_plain():
    """Generation (a KV cache) goes through transformers' attention forward and gives the same tokens."""
    plain = _lora_model("llama").eval()
    fast = copy.deepcopy(plain)
    apply_fast_path(fast, log=lambda _: None)
    prompt = _batch()["input_ids"][:1, :6]
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(fast.generate(prompt, **kw), plain.generate(prompt, **kw))


def test_attention_with_an_unknown_forward_keeps_its_own_rope():
    """A transformers version whose attention forward looks different is not patched, and says so."""
    model = _lora_model("llama")
    attention = model.model.layers[1].self_attn
    cls = type(attention)
    attention.__class__ = type("OddAttention", (cls,), {"forward": lambda self, hidden_states, mask: None})
    keys = set(model.state_dict())
    lines = []
    counts = apply_fast_path(model, log=lines.append)
    assert counts["rope"] == 1 and counts["rms_norm"] == 5
    assert "forward" not in attention.__dict__
    assert any(line.startswith("fast path: model.layers.1.self_attn: rope not patched (forward(") and
               line.endswith("is not the expected one); transformers' own RoPE") for line in lines), lines
    assert set(model.state_dict()) == keys  # patching never renames parameters


def test_lora_dropout_modules_stay_on_the_plain_layer():
    lines = []
    model = _lora_model("llama", dropout=0.1)
    counts = apply_fast_path(model, log=lines.append)
    assert counts["lora_linear"] == 0 and counts["rms_norm"] == 5
    assert not any(m.fused for m in lora_modules(model).values())
    assert "fast path: lora_linear: 14 projections with dropout or a trainable base stay on the plain " \
           "LoRALinear path" in lines


def test_unsupported_family_is_left_alone():
    lines = []
    model = _lora_model("gemma2")
    before = {name: m.forward for name, m in model.named_modules() if "forward" in m.__dict__}
    assert apply_fast_path(model, log=lines.append) == {}
    assert lines == ["fast path: gemma2 is not supported yet (Gemma needs GeGLU, (1+w) RMSNorm and "
                     "soft-capping); training on the plain path"]
    assert not getattr(model, "_deftune_fast", False)
    assert before == {name: m.forward for name, m in model.named_modules() if "forward" in m.__dict__}


# --- the fused LoRA linear -----------------------------------------------------------------------------


def _plain_lora_reference(x, base, a, b, scaling):
    """The plain LoRALinear's math: base(x) + s * B A x, A/B applied in float32."""
    return base(x) + (x.float() @ a.t() @ b.t() * scaling).to(x.dtype)


@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_matches_plain_layer_fp32(bias):
    torch.manual_seed(0)
    base = torch.nn.Linear(37, 23, bias=bias).requires_grad_(False)
    plain = LoRALinear(base, rank=5, alpha=7.0)
    torch.nn.init.normal_(plain.lora_B.weight)
    fused = copy.deepcopy(plain)
    fused.fused = True
    x = torch.randn(3, 11, 37)
    x_plain, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_plain, out_fused = plain(x_plain), fused(x_fused)
    torch.testing.assert_close(out_fused, out_plain, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(out_plain)
    out_plain.backward(dy)
    out_fused.backward(dy)
    torch.testing.assert_close(x_fused.grad, x_plain.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.lora_A.weight.grad, plain.lora_A.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.lora_B.weight.grad, plain.lora_B.weight.grad, atol=1e-5, rtol=1e-5)
    assert base.weight.grad is None


def test_lora_linear_saves_only_x_and_the_rank_space_product():
    """Saved for backward: x [.., in], u = x A^T [.., r], and the A, B parameters themselves; nothing of
    the output's width (no output, no dropout copy, no float32 copy of x)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(40, 24, bias=False).requires_grad_(False)
    layer = LoRALinear(base, rank=4, alpha=8.0)
    x = torch.randn(2, 7, 40, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora_linear(x, base, layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    activations = [t for t in saved if t is not layer.lora_A.weight and t is not layer.lora_B.weight]
    # u is kept flattened to rows [B*T, r].
    assert sorted(tuple(t.shape) for t in activations) == [(2, 7, 40), (14, 4)]
    assert any(t.data_ptr() == x.data_ptr() for t in activations)  # x itself, not a copy


def test_lora_linear_bf16_base_fp32_adapters_and_dequantize():
    """W0 in bf16 (computed in bf16), A/B float32 masters get float32 grads; a base exposing
    ``dequantize()`` (4-bit) is read through it."""

    class DequantizingBase(torch.nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.packed = weight.clone()
            self.bias = None
            self.compute_dtype = weight.dtype
            self.calls = 0

        def dequantize(self):
            self.calls += 1
            return self.packed

    torch.manual_seed(0)
    w0 = torch.randn(24, 40).to(torch.bfloat16)
    base = DequantizingBase(w0)
    a = (torch.randn(4, 40) * 0.1).requires_grad_()
    b = (torch.randn(24, 4) * 0.1).requires_grad_()
    x = torch.randn(5, 40, dtype=torch.bfloat16, requires_grad=True)
    out = lora_linear(x, base, a, b, 2.0)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert base.calls == 2  # forward and backward; no dequantized copy kept in between

    linear = torch.nn.Linear(40, 24, bias=False).requires_grad_(False)
    linear.weight.data = w0.float()
    xr, ar, br = (t.detach().float().requires_grad_() for t in (x, a, b))
    ref = _plain_lora_reference(xr, linear, ar, br, 2.0)
    ref.square().sum().backward()
    # bf16 keeps 8 mantissa bits and the upstream gradient (2 * out) is itself rounded, so single
    # elements can be off by several percent; the error relative to the whole tensor stays ~1e-2.
    for got, want in ((out, ref), (x.grad, xr.grad), (a.grad, ar.grad), (b.grad, br.grad)):
        assert float((got.detach().float() - want.detach()).norm() / want.norm()) < 2e-2


# --- end to end through the recipe -----------------------------------------------------------------------


def _losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_fast_training_matches_plain_and_saves_a_peft_adapter(tiny_llama_dir, copy_task_file, tmp_path,
                                                              capsys):
    runs = {}
    for fast in (False, True):
        recipe = tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / f"fast-{fast}", device="cpu",
                             model={"path": str(tiny_llama_dir), "fast": fast}, train={"max_steps": 5})
        runs[fast] = api.train(recipe, progress=False)
    out = capsys.readouterr().out
    assert "fast path: rms_norm 5 modules, rope 2 attention modules, swiglu 2 MLPs, lora_linear 14 " \
           "projections, linear_cross_entropy 1 head" in out
    plain, fast = _losses(runs[False].run_dir), _losses(runs[True].run_dir)
    assert len(plain) == len(fast) == 5
    for p, f in zip(plain, fast):
        assert f == pytest.approx(p, rel=1e-4)

    peft = pytest.importorskip("peft")
    ids = make_tiny_tokenizer()("### Instruction:\ncopy: fox the dog\n### Response:\n",
                                return_tensors="pt")["input_ids"]
    ours, _, _ = api.load_for_inference(runs[True].run_dir, device="cpu")
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, str(Path(runs[True].run_dir) / "adapter")).eval()
    with torch.no_grad():
        theirs_logits, ours_logits = theirs(input_ids=ids).logits, ours(input_ids=ids).logits
    torch.testing.assert_close(theirs_logits, ours_logits, atol=1e-5, rtol=0)


def test_unsupported_family_trains_on_the_plain_path(copy_task_file, tmp_path, capsys):
    folder = tmp_path / "gemma2"
    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(0)
    config = _config("gemma2")
    config.vocab_size = len(tokenizer)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    recipe = tiny_recipe(folder, copy_task_file, tmp_path / "run", model={"path": str(folder), "fast": True},
                         train={"max_steps": 3})
    summary = api.train(recipe, progress=False)
    assert "fast path: gemma2 is not supported yet (Gemma needs GeGLU, (1+w) RMSNorm and soft-capping); " \
           "training on the plain path" in capsys.readouterr().out
    losses = _losses(summary.run_dir)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


# --- activation offloading -------------------------------------------------------------------------------


def test_offload_activations_is_refused_without_a_gpu(tiny_llama_dir, copy_task_file, tmp_path):
    recipe = tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "run", device="cpu",
                         train={"offload_activations": True})
    with pytest.raises(DeftuneError, match="train.offload_activations needs a CUDA GPU"):
        api.prepare_model(recipe, _lora_model("llama").cpu(), torch.device("cpu"))
    with pytest.raises(DeftuneError, match="train.offload_activations needs a CUDA GPU"):
        api.train(recipe, progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was loaded or written


@pytest.mark.parametrize("fast", [False, True])
def test_offloaded_checkpoint_keeps_gradients(monkeypatch, fast):
    """On CPU the host copy is a plain clone: the same checkpoint logic runs, and every layer is
    recomputed from its restored copy in backward."""
    restores = []
    real_restore = offload.OffloadedTensor.restore
    monkeypatch.setattr(offload.OffloadedTensor, "restore",
                        lambda self: restores.append(1) or real_restore(self))
    plain = _lora_model("llama").train()
    if fast:
        apply_fast_path(plain, log=lambda _: None)
    wrapped = copy.deepcopy(plain)
    assert offload.wrap_decoder_layers(wrapped) == 2
    batch = _batch()
    loss_p, _, grads_p = _loss_and_grads(plain, batch)
    loss_w, _, grads_w = _loss_and_grads(wrapped, batch)
    assert len(restores) == 2
    assert loss_w == pytest.approx(loss_p, rel=1e-6)
    for name in grads_p:
        torch.testing.assert_close(grads_w[name], grads_p[name], atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():  # outside training no checkpoint: nothing saved, nothing restored
        wrapped(input_ids=batch["input_ids"], use_cache=False)
    assert len(restores) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fast", [False, True])
def test_offloaded_checkpoint_on_cuda(fast):
    plain = _lora_model("llama").train()
    if fast:
        apply_fast_path(plain, log=lambda _: None)
    wrapped = copy.deepcopy(plain)
    assert offload.enable_offloaded_checkpointing(wrapped, torch.device("cuda")) == 2
    batch = _batch()
    _assert_same_step(plain, wrapped, batch, rel=1e-5, atol=1e-5, rtol=1e-4)



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_training_matches_plain_on_cuda(tiny_llama_dir, copy_task_file, tmp_path):
    losses = {}
    for fast in (False, True):
        recipe = tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / f"fast-{fast}", device="cuda",
                             model={"path": str(tiny_llama_dir), "fast": fast},
                             train={"max_steps": 5, "offload_activations": fast})
        losses[fast] = _losses(api.train(recipe, progress=False).run_dir)
    # bf16 weights: the fused kernels round in other places than the plain path (the LoRA branch is
    # bf16 here, float32 there), so per-step losses agree to bf16 precision only.
    for p, f in zip(losses[False], losses[True]):
        assert f == pytest.approx(p, rel=2e-2)


@pytest.mark.parametrize("fast,offloaded", [(False, False), (True, False), (True, True)])
def test_tiled_mlp_keeps_loss_and_gradients(fast, offloaded):
    """MLP tiling (train.mlp_tile_tokens) changes no value: loss and every LoRA gradient equal the
    untiled model's, alone, over the fast path, and nested in the offloaded layer checkpoint."""
    from deftune.kernels.tiled_mlp import tile_mlps

    plain = _lora_model("llama").train()
    if fast:
        apply_fast_path(plain, log=lambda _: None)
    tiled = copy.deepcopy(plain)
    if offloaded:
        offload.wrap_decoder_layers(tiled)
    assert tile_mlps(tiled, 5) == 2  # 3 x 13 = 39 tokens -> 8 tiles
    batch = _batch()
    _assert_same_step(plain, tiled, batch, rel=1e-6, atol=1e-6, rtol=1e-5)


def test_tiled_mlp_never_holds_the_whole_sequence_intermediate():
    """Saved for backward while the tiled model runs forward: nothing of size tokens x intermediate."""
    from deftune.kernels.tiled_mlp import tile_mlps

    model = _lora_model("llama").train()
    tile_mlps(model, 4)
    batch = _batch()
    tokens = batch["input_ids"].numel()
    intermediate = model.config.intermediate_size
    sizes = []

    def pack(t):
        if t.dim() and t.shape[-1] == intermediate:  # MLP intermediates (gate / up / act outputs)
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        response_loss_sum(model, batch)
    assert max(sizes, default=0) < tokens * intermediate
    # Without tiling the MLP saves its [tokens, intermediate] activations.
    untiled = _lora_model("llama").train()
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        response_loss_sum(untiled, batch)
    assert max(sizes) >= tokens * intermediate


def test_mlp_tile_tokens_is_checked():
    from deftune.config import recipe_from_dict

    with pytest.raises(DeftuneError, match="train.mlp_tile_tokens"):
        recipe_from_dict({"train": {"mlp_tile_tokens": -1}})


# --- recompute: early stop before the down projection, MLP stash (train.offload_mlp_layers) ---------------


def _count_calls(monkeypatch):
    """Counts of base GEMMs run (FrozenAddmm) and handed back (GivenOutput), split forward / backward."""
    from deftune.kernels import lora_linear as ll

    calls = {"gemm": 0, "given": 0}
    for cls, key in ((ll.FrozenAddmmFunction, "gemm"), (ll.GivenOutputFunction, "given")):
        real = cls.forward

        def counted(ctx, *args, _real=real, _key=key):
            calls[_key] += 1
            return _real(ctx, *args)

        monkeypatch.setattr(cls, "forward", staticmethod(counted))
    return calls


@pytest.mark.parametrize("how", ["transformers", "offloaded"])
def test_recompute_stops_before_the_down_projection(monkeypatch, how):
    """A checkpointed layer's recompute runs q, k, v, o, gate and up but not down: down's GEMM runs after
    the layer's last saved tensor, where torch's non-reentrant checkpoint stops recomputing."""
    plain = _lora_model("llama").train()
    apply_fast_path(plain, log=lambda _: None)
    wrapped = copy.deepcopy(plain)
    if how == "transformers":
        wrapped.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        offload.wrap_decoder_layers(wrapped)
    batch = _batch()
    loss_p, _, grads_p = _loss_and_grads(plain, batch)
    calls = _count_calls(monkeypatch)
    wrapped.zero_grad(set_to_none=True)
    loss, _ = response_loss_sum(wrapped, batch)
    assert calls["gemm"] == 14  # 2 layers x 7 projections
    loss.backward()
    assert calls["gemm"] == 14 + 2 * 6
    assert float(loss.detach()) == pytest.approx(loss_p, rel=1e-6)
    for name, p in wrapped.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads_p[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("host,gpu", [(1, 0), (2, 0), (0, 1), (1, 1)])
def test_mlp_stash_hands_gate_and_up_back_instead_of_recomputing(monkeypatch, host, gpu):
    """train.offload_mlp_layers (host) / train.keep_mlp_layers (gpu, the top layers): those layers recompute
    q, k, v, o only (gate/up come back from the kept copy, down is skipped); loss and every gradient equal
    the plain model's."""
    mlp_layers = host + gpu
    plain = _lora_model("llama").train()
    apply_fast_path(plain, log=lambda _: None)
    wrapped = copy.deepcopy(plain)
    assert offload.wrap_decoder_layers(wrapped, mlp_layers=host, resident_layers=gpu) == 2
    stashes = [layer._deftune_mlp_stash for layer in wrapped.model.layers]
    assert sum(s is not None for s in stashes) == mlp_layers
    assert [s.resident for s in stashes if s is not None] == [False] * host + [True] * gpu
    batch = _batch()
    loss_p, _, grads_p = _loss_and_grads(plain, batch)
    calls = _count_calls(monkeypatch)
    loss_w, _, grads_w = _loss_and_grads(wrapped, batch)
    assert calls["gemm"] == 14 + mlp_layers * 4 + (2 - mlp_layers) * 6
    assert calls["given"] == 2 * mlp_layers
    assert all(s is None or s.boxes == [] for s in stashes)  # host copies released after backward
    assert loss_w == pytest.approx(loss_p, rel=1e-6)
    for name in grads_p:
        torch.testing.assert_close(grads_w[name], grads_p[name], atol=1e-6, rtol=1e-5, msg=name)
    loss_2, _, _ = _loss_and_grads(wrapped, batch)  # a second step records afresh
    assert loss_2 == pytest.approx(loss_p, rel=1e-6)


def test_mlp_stash_is_checked():
    from deftune.config import recipe_from_dict

    with pytest.raises(DeftuneError, match="train.offload_mlp_layers needs train.offload_activations"):
        recipe_from_dict({"train": {"offload_mlp_layers": 2}})
    with pytest.raises(DeftuneError, match="cannot be combined"):
        recipe_from_dict({"train": {"offload_mlp_layers": 2, "offload_activations": True, "mlp_tile_tokens": 64}})
    with pytest.raises(DeftuneError, match="train.offload_mlp_layers must be >= 0"):
        recipe_from_dict({"train": {"offload_mlp_layers": -1}})
    fast = _lora_model("llama")
    apply_fast_path(fast, log=lambda _: None)
    with pytest.raises(DeftuneError, match=r"train.offload_mlp_layers=3 \+ train.keep_mlp_layers=0: must be 0..2"):
        offload.wrap_decoder_layers(fast, mlp_layers=3)
    with pytest.raises(DeftuneError, match=r"train.offload_mlp_layers=1 \+ train.keep_mlp_layers=2: must be 0..2"):
        offload.wrap_decoder_layers(fast, mlp_layers=1, resident_layers=2)
    with pytest.raises(DeftuneError, match="train.keep_mlp_layers needs train.offload_activations"):
        recipe_from_dict({"train": {"keep_mlp_layers": 1}})
    with pytest.raises(DeftuneError, match="needs model.fast"):
        offload.wrap_decoder_layers(_lora_model("llama"), mlp_layers=1)
    dropout = _lora_model("llama", dropout=0.1)
    apply_fast_path(dropout, log=lambda _: None)
    with pytest.raises(DeftuneError, match=r"gate_proj is LoRALinear with dropout"):
        offload.wrap_decoder_layers(dropout, mlp_layers=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("host,gpu", [(2, 0), (1, 1)])
def test_mlp_stash_on_cuda(host, gpu):
    plain = _lora_model("llama").train()
    apply_fast_path(plain, log=lambda _: None)
    wrapped = copy.deepcopy(plain)
    offload.enable_offloaded_checkpointing(wrapped, torch.device("cuda"), mlp_layers=host, resident_layers=gpu)
    batch = _batch()
    loss_p, _, grads_p = _loss_and_grads(plain, batch)
    for _step in range(2):
        loss_w, _, grads_w = _loss_and_grads(wrapped, batch)
        assert loss_w == pytest.approx(loss_p, rel=1e-5)
        for name in grads_p:
            torch.testing.assert_close(grads_w[name], grads_p[name], atol=1e-5, rtol=1e-4, msg=name)


# --- model.sdpa_backend ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [False, True])
def test_sdpa_backend_is_entered_around_every_attention_forward(monkeypatch, fast):
    """The preferred kernel is first in torch's priority list while each attention forward runs (also its
    recompute); outputs are unchanged."""
    from deftune.kernels import sdpa

    model = _lora_model("llama").train()
    model.config._attn_implementation = "sdpa"
    if fast:
        apply_fast_path(model, log=lambda _: None)
    batch = _batch()
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], use_cache=False).logits
    entered = []
    real = sdpa.sdpa_kernel

    def recording(order, set_priority=False):
        entered.append((order[0], set_priority))
        return real(order, set_priority=set_priority)

    monkeypatch.setattr(sdpa, "sdpa_kernel", recording)
    assert sdpa.prefer_sdpa_backend(model, "math") == 2
    with torch.no_grad():
        after = model(input_ids=batch["input_ids"], use_cache=False).logits
    assert entered == [(torch.nn.attention.SDPBackend.MATH, True)] * 2
    torch.testing.assert_close(after, before)


def test_sdpa_backend_is_checked():
    from deftune.config import recipe_from_dict
    from deftune.kernels.sdpa import prefer_sdpa_backend

    with pytest.raises(DeftuneError, match="model.sdpa_backend must be auto, cudnn"):
        recipe_from_dict({"model": {"sdpa_backend": "fa3"}})
    model = _lora_model("llama")
    model.config._attn_implementation = "eager"
    with pytest.raises(DeftuneError, match="applies to model.attn_implementation=sdpa; this model runs 'eager'"):
        prefer_sdpa_backend(model, "cudnn")


def test_fast_mlp_saves_gate_and_up_only():
    """The patched MLP keeps two [T, I] tensors per layer for backward (gate and up; the SwiGLU product
    is rebuilt in backward), and its gradients equal the plain MLP's."""
    model = _lora_model("llama").train()
    plain = copy.deepcopy(model)
    apply_fast_path(model, log=lambda _: None)
    batch = _batch()
    intermediate = model.config.intermediate_size
    tokens = batch["input_ids"].numel()
    widths = []

    def pack(t):
        if t.numel() == tokens * intermediate:  # activations [T, I]; not down_proj's lora_A [r, I]
            widths.append(t.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        response_loss_sum(model, batch)
    assert len(set(widths)) == 2 * model.config.num_hidden_layers
    _assert_same_step(plain, model, batch, rel=1e-5, atol=1e-5, rtol=1e-4)


def test_mlp_backward_gets_no_zero_gradient_for_the_product(monkeypatch):
    """The SwiGLU product handed to the base GEMM never gets a gradient; autograd must not build a
    [T, I] tensor of zeros for it (set_materialize_grads(False))."""
    from deftune.kernels import lora_linear as ll

    seen = []
    real = ll.SwiGLULoRADeltaFunction.backward

    def recording(ctx, dy2, dh2):
        seen.append(dh2)
        return real(ctx, dy2, dh2)

    monkeypatch.setattr(ll.SwiGLULoRADeltaFunction, "backward", staticmethod(recording))
    model = _lora_model("llama").train()
    apply_fast_path(model, log=lambda _: None)
    _loss_and_grads(model, _batch())
    assert len(seen) == 2 and all(g is None for g in seen)


def test_lora_group_matches_separate_layers_with_mixed_ranks_bias_and_an_unused_output():
    """lora_group (projections sharing x: one rank GEMM, one dx buffer) == each plain LoRALinear on its
    own: outputs, dx, every dA/dB; ranks and scalings may differ; an output that reaches no loss gives
    zero dB."""
    from deftune.kernels.lora_linear import lora_group

    torch.manual_seed(0)
    # Scalings 2, 1 (alpha = r: no multiply in the dB path) and 4/3.
    plain = [LoRALinear(torch.nn.Linear(24, out, bias=bias).requires_grad_(False), rank=r, alpha=alpha)
             for out, r, bias, alpha in ((16, 4, True, 8.0), (8, 2, False, 2.0), (8, 6, True, 8.0))]
    for p in plain:
        torch.nn.init.normal_(p.lora_B.weight)
    fused = copy.deepcopy(plain)
    for p in fused:
        p.fused = True
    x = torch.randn(2, 5, 24)
    xp, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    outs_p = [p(xp) for p in plain]
    outs_f = lora_group(xf, fused)
    for got, want in zip(outs_f, outs_p):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    dys = [torch.randn_like(o) for o in outs_p]
    sum((o * d).sum() for o, d in zip(outs_p[:2], dys)).backward()  # the third output is unused
    sum((o * d).sum() for o, d in zip(outs_f[:2], dys)).backward()
    torch.testing.assert_close(xf.grad, xp.grad, atol=1e-5, rtol=1e-5)
    for p, f in zip(plain, fused):
        for name in ("lora_A", "lora_B"):
            want = getattr(p, name).weight.grad
            got = getattr(f, name).weight.grad
            torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_lora_factor_casts_follow_every_update(fused):
    """The compute-dtype copies of A and s*B are cached between forward, recompute and backward; an
    optimizer step (fused or foreach AdamW), load_state_dict and a ``.data`` swap must all reach the next
    forward, and a backward releases the copies it used."""
    from deftune.kernels import lora_linear as ll

    torch.manual_seed(0)
    base = torch.nn.Linear(24, 16, bias=True).to(torch.bfloat16).requires_grad_(False)
    a = torch.nn.Parameter(0.1 * torch.randn(4, 24))
    b = torch.nn.Parameter(0.1 * torch.randn(16, 4))
    x = torch.randn(5, 24, dtype=torch.bfloat16)

    def want():
        with torch.no_grad():
            return base(x) + (x.float() @ a.t() @ b.t() * 2.0).to(torch.bfloat16)

    def _close(actual, expected):
        torch.testing.assert_close(actual.float(), expected.float(), atol=2e-2, rtol=2e-2)

    def got():
        with torch.no_grad():
            return ll.lora_linear(x, base, a, b, 2.0)

    _close(got(), want())
    assert a in ll._CASTS and b in ll._CASTS  # cached by the forward
    opt = torch.optim.AdamW([a, b], lr=0.05, fused=fused, foreach=None if fused else True)
    out = ll.lora_linear(x, base, a, b, 2.0)
    out.float().square().sum().backward()
    assert a not in ll._CASTS and b not in ll._CASTS  # released by the backward
    before = got().clone()
    opt.step()
    after = got()
    assert not torch.equal(after, before)
    _close(after, want())
    with torch.no_grad():
        b.copy_(torch.full_like(b, 0.01))  # in place: bumps the version counter
    _close(got(), want())
    b.data = torch.full_like(b, -0.02)  # a new storage behind the same parameter
    _close(got(), want())


def test_base_gemm_accumulates_into_the_adapter_term_in_place(monkeypatch):
    """The frozen GEMM adds x W0^T onto the adapter term's own buffer (no copy of it into a new output),
    and values and gradients still equal base(x) + s (x A^T) B^T."""
    from deftune.kernels import lora_linear as ll

    torch.manual_seed(0)
    base = torch.nn.Linear(24, 16, bias=True).requires_grad_(False)
    a = torch.nn.Parameter(0.1 * torch.randn(4, 24))
    b = torch.nn.Parameter(0.1 * torch.randn(16, 4))
    x = torch.randn(5, 24, requires_grad=True)
    seen = {}
    real = ll.LoRAGroupDeltaFunction.forward

    def spy(ctx, *args):
        (seen["low"],) = lows = real(ctx, *args)
        return lows

    monkeypatch.setattr(ll.LoRAGroupDeltaFunction, "forward", staticmethod(spy))
    y = ll.lora_linear(x, base, a, b, 2.0)
    assert y.data_ptr() == seen["low"].data_ptr()
    xr, ar, br = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    ref = base(xr) + (xr @ ar.t() @ br.t()) * 2.0
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    y.backward(g)
    ref.backward(g)
    for got, want in ((x.grad, xr.grad), (a.grad, ar.grad), (b.grad, br.grad)):
        torch.testing.assert_close(got, want)


def test_frozen_factors_get_no_gradient_and_the_others_the_right_one():
    """A factor that does not require grad (a frozen stage, or A kept fixed) gets none; dx and the other
    factor's gradient still match autograd's."""
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 16, bias=False).requires_grad_(False)
    a = 0.1 * torch.randn(4, 24)  # frozen
    b = torch.nn.Parameter(0.1 * torch.randn(16, 4))
    x = torch.randn(5, 24, requires_grad=True)
    y = lora_linear(x, base, a, b, 2.0)
    xr, br = x.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    ref = base(xr) + (xr @ a.t() @ br.t()) * 2.0
    g = torch.randn_like(ref)
    y.backward(g)
    ref.backward(g)
    assert a.grad is None
    torch.testing.assert_close(b.grad, br.grad)
    torch.testing.assert_close(x.grad, xr.grad)


def test_lora_factor_casts_work_for_inference_tensors():
    """Factors created under inference_mode have no version counter: they are cast every time, not cached."""
    from deftune.kernels import lora_linear as ll

    torch.manual_seed(0)
    base = torch.nn.Linear(24, 16, bias=False).to(torch.bfloat16).requires_grad_(False)
    with torch.inference_mode():
        a = 0.1 * torch.randn(4, 24)
        b = 0.1 * torch.randn(16, 4)
        x = torch.randn(5, 24, dtype=torch.bfloat16)
        y = ll.lora_linear(x, base, a, b, 2.0)
        want = base(x) + (x.float() @ a.t() @ b.t() * 2.0).to(torch.bfloat16)
    torch.testing.assert_close(y.float(), want.float(), atol=2e-2, rtol=2e-2)
    assert a not in ll._CASTS and b not in ll._CASTS


def test_fast_path_under_autocast_with_a_float32_base():
    """model.dtype float32 + the trainer's bf16 autocast: the fused projections compute in autocast's dtype
    as F.linear would (W0 cast per use), so forward and backward run and match the plain model under the same
    autocast (they used to mix float32 and bf16 in one matmul)."""
    plain = _lora_model("llama").float()
    fast = copy.deepcopy(plain)
    apply_fast_path(fast, log=lambda _: None)
    batch = _batch()
    results = []
    for model in (plain, fast):
        model.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss, _ = response_loss_sum(model, batch)
        loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        results.append((float(loss), grads))
    (loss_p, grads_p), (loss_f, grads_f) = results
    assert loss_f == pytest.approx(loss_p, rel=2e-2)
    for name, want in grads_p.items():
        assert grads_f[name].dtype == torch.float32
        rel = float((grads_f[name] - want).norm() / want.norm().clamp_min(1e-12))
        assert rel < 0.1, (name, rel)


# --- train.reuse_dequantized: a 4-bit layer's recompute hands its dequantized weights to its backward ------


def _nf4_lora_model():
    from deftune.models.quantize import quantize_model

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config("llama"))
    quantize_model(model)
    attach_lora(model, "all-linear", "all", rank=4, alpha=8)
    for module in lora_modules(model).values():
        torch.nn.init.normal_(module.lora_B.weight, std=0.1)
    apply_fast_path(model, log=lambda _: None)
    return model.to(DEVICE).train()


def test_reuse_dequantized_skips_the_backward_dequantization_after_a_recompute(monkeypatch):
    """With keep_dequantized, each projection a recompute ran (q, k, v, o, gate, up; not down, which the
    recompute never reaches) is not dequantized again in backward; layer 0's q/k/v need no dx (the
    embedding is frozen), so their kept weights are dropped unused. Loss and gradients are unchanged and
    nothing stays kept after the step."""
    from deftune.kernels import lora_linear as ll
    from deftune.models.quantize import NF4Linear

    calls = []
    real, real_group = NF4Linear.dequantize, NF4Linear.dequantize_group
    monkeypatch.setattr(NF4Linear, "dequantize", lambda self: calls.append(1) or real(self))
    # Weights dequantized in a group (one launch for q/k/v/o, one for gate/up) count one each here.
    monkeypatch.setattr(NF4Linear, "dequantize_group",
                        staticmethod(lambda layers: calls.extend([1] * len(layers)) or real_group(layers)))
    batch = _batch()
    counts, results = {}, {}
    for keep in (False, True):
        model = _nf4_lora_model()
        assert offload.wrap_decoder_layers(model, keep_dequantized=keep) == 2
        calls.clear()
        results[keep] = _loss_and_grads(model, batch)
        counts[keep] = len(calls)
        assert len(ll._KEPT_WEIGHTS) == 0
    # forward 2 x 7, recompute 2 x 6, backward 2 x 7 minus layer 0's q/k/v (no dx wanted there)
    assert counts[False] == 14 + 12 + 11
    assert counts[True] == counts[False] - 6 - 3
    assert results[True][0] == results[False][0]
    for name, grad in results[False][2].items():
        assert torch.equal(results[True][2][name], grad), name


def test_grouped_dequantization_launches_once_per_block_with_the_same_results(monkeypatch):
    """4-bit q/k/v/o are dequantized in one launch per attention block and gate/up in one per MLP (down
    on its own): 7 launches per layer forward become 3, and a recompute's 6 become 2. Loss and gradients
    equal those of one launch per projection (GROUP_BYTES = 0) bit for bit, and nothing stays grouped."""
    import deftune.models.quantize as quantize_module
    from deftune.kernels import lora_linear as ll
    from deftune.kernels import nf4 as nf4_module

    # One entry per call (the launch count on a GPU): 1 for a single weight, the weights of a group.
    launches = []
    real_single, real_group = nf4_module.dequantize_nf4_double, nf4_module.dequantize_nf4_double_group
    monkeypatch.setattr(quantize_module, "dequantize_nf4_double",
                        lambda *a, **k: launches.append(1) or real_single(*a, **k))
    monkeypatch.setattr(quantize_module, "dequantize_nf4_double_group",
                        lambda weights, *a, **k: launches.append(len(weights)) or real_group(weights, *a, **k))
    batch = _batch()
    results, counts = {}, {}
    grouped = ll._group_bytes("128")  # the opt-in value (DEFTUNE_NF4_GROUP_MIB=128); the default is 0
    for cap in (0, grouped):
        monkeypatch.setattr(ll, "GROUP_BYTES", cap)
        model = _nf4_lora_model()
        assert offload.wrap_decoder_layers(model) == 2
        launches.clear()
        results[cap] = _loss_and_grads(model, batch)
        counts[cap] = (len(launches), sum(launches))
        assert ll._GROUPED.get() is None
    # (launches, weights): forward 2 x 7, recompute 2 x 6, backward 11 (layer 0's q/k/v need no dx)
    assert counts[0] == (37, 37)
    assert counts[grouped] == (2 * 3 + 2 * 2 + 11, 37)
    assert results[0][0] == results[grouped][0]
    for name, grad in results[0][2].items():
        assert torch.equal(results[grouped][2][name], grad), name


_GROUPED_THROUGH_KERNELS = """
import sys
import torch
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import test_fast_path as t
from deftune.kernels import _nf4_triton, offload
from deftune.kernels import lora_linear as ll

groups = []
real = _nf4_triton.dequantize_nf4_double_group_triton
_nf4_triton.dequantize_nf4_double_group_triton = lambda w, *a, **k: groups.append(len(w)) or real(w, *a, **k)
results = {}
for cap in (0, ll._group_bytes("128")):
    ll.GROUP_BYTES = cap
    model = t._nf4_lora_model()
    assert offload.wrap_decoder_layers(model) == 2
    results[cap] = t._loss_and_grads(model, t._batch())
assert groups == [4, 2] * 4, groups  # forward and recompute of 2 layers, in the grouped run only
if torch.cuda.is_available():
    # Compiled, the two kernels may contract k * step + m into an FMA differently: a last-bit difference
    # in a rare absmax moves a bf16 rounding, not the result.
    torch.testing.assert_close(torch.tensor(results[cap][0]), torch.tensor(results[0][0]), rtol=1e-3, atol=0)
    for name, grad in results[0][2].items():
        torch.testing.assert_close(results[cap][2][name], grad, rtol=2e-2, atol=1e-6, msg=name)
else:
    assert results[0][0] == results[cap][0]
    for name, grad in results[0][2].items():
        assert torch.equal(results[cap][2][name], grad), name
print("ok")
"""


def test_grouped_dequantization_through_the_kernels_matches_one_launch_per_projection():
    """The same as above through the Triton kernels (compiled on a GPU, Triton's interpreter on CPU) inside
    the patched, offloaded model: the group kernel runs, and loss and gradients equal one launch per
    projection. In a fresh process: Triton fixes a kernel's mode (interpreted or compiled) when the kernel
    is defined, and this file's other tests run the references with the interpreter off."""
    _grouped_through_kernels()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_dequantization_through_the_kernels_on_cuda():
    """The same on the card (selected by ``pytest -m gpu``)."""
    _grouped_through_kernels()


def _grouped_through_kernels() -> None:
    pytest.importorskip("triton", reason="the kernels need triton (extra: deftune[kernels])")
    here = Path(__file__).resolve().parent
    env = {**os.environ, "TRITON_INTERPRET": "0" if torch.cuda.is_available() else "1"}
    out = subprocess.run([sys.executable, "-c", _GROUPED_THROUGH_KERNELS, str(here), str(here.parent)],
                         capture_output=True, text=True, timeout=600, env=env, check=False)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_group_size_from_the_environment_is_checked():
    from deftune.kernels.lora_linear import GROUP_BYTES, _group_bytes

    if "DEFTUNE_NF4_GROUP_MIB" not in os.environ:
        assert GROUP_BYTES == 0  # grouping is an opt-in (measured slower without cached launches)

    assert _group_bytes("128") == 128 * 2**20 and _group_bytes("0") == 0
    for bad in ("lots", "-1", "nan"):
        with pytest.raises(ValueError, match="DEFTUNE_NF4_GROUP_MIB"):
            _group_bytes(bad)


def test_reuse_dequantized_is_checked():
    from deftune.config import recipe_from_dict

    with pytest.raises(DeftuneError, match="train.reuse_dequantized"):
        recipe_from_dict({"train": {"reuse_dequantized": True, "offload_activations": True},
                          "model": {"fast": True}})
    with pytest.raises(DeftuneError, match="train.reuse_dequantized"):
        recipe_from_dict({"train": {"reuse_dequantized": True}, "model": {"fast": True, "quantize": "nf4"}})
    recipe = recipe_from_dict({"train": {"reuse_dequantized": True, "offload_activations": True},
                               "model": {"fast": True, "quantize": "nf4"}})
    assert recipe.train.reuse_dequantized


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reuse_dequantized_on_cuda():
    """The same on the card (side-stream offload, Triton NF4 kernel): a step with the kept weights gives the
    loss and gradients of a step without them, bit for bit."""
    from deftune.kernels import lora_linear as ll

    results = []
    for keep in (False, True):
        model = _nf4_lora_model()
        assert offload.enable_offloaded_checkpointing(model, torch.device("cuda"), keep_dequantized=keep) == 2
        results.append(_loss_and_grads(model, _batch()))
        assert len(ll._KEPT_WEIGHTS) == 0
    assert results[0][0] == results[1][0]
    for name, grad in results[0][2].items():
        assert torch.equal(results[1][2][name], grad), name
