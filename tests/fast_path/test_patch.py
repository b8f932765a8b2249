"""The fast path (``model.fast``, :mod:`deftune.fast_path.patch`) against the plain path on tiny seeded
models of every supported family: what is patched, that the patched model computes what the plain one
does (logits, loss, gradients, generation, under autocast), and that training through the recipe and
saving are unchanged.

On CPU these tests run the kernels' PyTorch references (see fast_models.py); on a GPU the Triton kernels run.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers
from conftest import make_tiny_tokenizer, tiny_recipe
from fast_models import (  # noqa: F401 (reference_path_on_cpu: an autouse fixture)
    DEVICE,
    FAMILIES,
    assert_same_step,
    family_config,
    lora_model,
    loss_and_grads,
    make_batch,
    reference_path_on_cpu,
    run_losses,
)

from deftune import api
from deftune.adapters.lora import layer as lora_layer
from deftune.adapters.lora.model import lora_modules
from deftune.fast_path import patch
from deftune.fast_path.patch import apply_fast_path, fast_counts, is_fast
from deftune.kernels import lora_linear as ll
from deftune.kernels.lora_linear import lora_linear
from deftune.training.loss import response_loss_sum

# 2 layers: input + post-attention norm per layer and the final norm; Qwen3 adds q_norm and k_norm.
RMS_NORMS = {"llama": 5, "qwen2": 5, "qwen3": 9, "mistral": 5}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_patch_counts_per_family(family):
    lines = []
    model = lora_model(family)
    assert not is_fast(model) and fast_counts(model) == {}
    counts = apply_fast_path(model, log=lines.append)
    assert is_fast(model) and fast_counts(model) == counts
    assert counts == {"rms_norm": RMS_NORMS[family], "rope": 2, "swiglu": 2, "lora_linear": 14,
                      "linear_cross_entropy": 1}
    assert lines == [(f"fast path: rms_norm {RMS_NORMS[family]} modules, rope 2 attention modules, swiglu 2 "
                     f"MLPs, lora_linear 14 projections, linear_cross_entropy 1 head")]


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_logits_loss_and_grads_match_plain(family):
    plain = lora_model(family)
    fast = copy.deepcopy(plain)
    apply_fast_path(fast, log=lambda _: None)
    batch = make_batch()
    with torch.no_grad():
        # use_cache=False: with a cache the attention hands over to transformers' own forward.
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        torch.testing.assert_close(fast(**kw).logits, plain(**kw).logits, atol=1e-5, rtol=1e-5)
    loss_p, n_p, grads_p = loss_and_grads(plain, batch)
    loss_f, n_f, grads_f = loss_and_grads(fast, batch)
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
    # o_proj's fused LoRALinear calls lora_linear through the name its module imported.
    monkeypatch.setattr(lora_layer, "lora_linear", counting("lora_linear", lora_linear))
    model = lora_model("qwen3")
    apply_fast_path(model, log=lambda _: None)
    response_loss_sum(model, make_batch())
    # A LoRA down projection takes the product inside its own Function (swiglu_lora_linear); q/k/v and
    # gate/up, which read the same input, run as one group each (lora_group); o_proj alone.
    assert calls == {"rms_norm": 9, "rope_qk": 2, "swiglu": 0, "swiglu_lora_linear": 2, "linear_cross_entropy": 1,
                     "lora_group": 4, "lora_linear": 2}


def test_fast_path_generation_matches_plain():
    """Generation (a KV cache) goes through transformers' attention forward and gives the same tokens."""
    plain = lora_model("llama").eval()
    fast = copy.deepcopy(plain)
    apply_fast_path(fast, log=lambda _: None)
    prompt = make_batch()["input_ids"][:1, :6]
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(fast.generate(prompt, **kw), plain.generate(prompt, **kw))


def test_attention_with_an_unknown_forward_keeps_its_own_rope():
    """A transformers version whose attention forward looks different is not patched, and says so."""
    model = lora_model("llama")
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
    model = lora_model("llama", dropout=0.1)
    counts = apply_fast_path(model, log=lines.append)
    assert counts["lora_linear"] == 0 and counts["rms_norm"] == 5
    assert not any(m.fused for m in lora_modules(model).values())
    assert "fast path: lora_linear: 14 projections with dropout or a trainable base stay on the plain " \
           "LoRALinear path" in lines


def test_unsupported_family_is_left_alone():
    lines = []
    model = lora_model("gemma2")
    before = {name: m.forward for name, m in model.named_modules() if "forward" in m.__dict__}
    assert apply_fast_path(model, log=lines.append) == {}
    assert lines == [("fast path: gemma2 is not supported yet (Gemma needs GeGLU, (1+w) RMSNorm and "
                     "soft-capping); training on the plain path")]
    assert not is_fast(model) and fast_counts(model) == {}
    assert before == {name: m.forward for name, m in model.named_modules() if "forward" in m.__dict__}


def test_fast_mlp_saves_gate_and_up_only():
    """The patched MLP keeps two [T, I] tensors per layer for backward (gate and up; the SwiGLU product
    is rebuilt in backward), and its gradients equal the plain MLP's."""
    model = lora_model("llama").train()
    plain = copy.deepcopy(model)
    apply_fast_path(model, log=lambda _: None)
    batch = make_batch()
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
    assert_same_step(plain, model, batch, rel=1e-5, atol=1e-5, rtol=1e-4)


def test_mlp_backward_gets_no_zero_gradient_for_the_product(monkeypatch):
    """The SwiGLU product handed to the base GEMM never gets a gradient; autograd must not build a
    [T, I] tensor of zeros for it (set_materialize_grads(False))."""
    seen = []
    real = ll.SwiGLULoRADeltaFunction.backward

    def recording(ctx, dy2, dh2):
        seen.append(dh2)
        return real(ctx, dy2, dh2)

    monkeypatch.setattr(ll.SwiGLULoRADeltaFunction, "backward", staticmethod(recording))
    model = lora_model("llama").train()
    apply_fast_path(model, log=lambda _: None)
    loss_and_grads(model, make_batch())
    assert len(seen) == 2 and all(g is None for g in seen)


def test_fast_path_under_autocast_with_a_float32_base():
    """model.dtype float32 + the trainer's bf16 autocast: the fused projections compute in autocast's dtype
    as F.linear would (W0 cast per use), so forward and backward run and match the plain model under the same
    autocast (they used to mix float32 and bf16 in one matmul)."""
    plain = lora_model("llama").float()
    fast = copy.deepcopy(plain)
    apply_fast_path(fast, log=lambda _: None)
    batch = make_batch()
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


# --- end to end through the recipe -----------------------------------------------------------------------


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
    plain, fast = run_losses(runs[False].run_dir), run_losses(runs[True].run_dir)
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
    config = family_config("gemma2")
    config.vocab_size = len(tokenizer)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    recipe = tiny_recipe(folder, copy_task_file, tmp_path / "run", model={"path": str(folder), "fast": True},
                         train={"max_steps": 3})
    summary = api.train(recipe, progress=False)
    assert "fast path: gemma2 is not supported yet (Gemma needs GeGLU, (1+w) RMSNorm and soft-capping); " \
           "training on the plain path" in capsys.readouterr().out
    losses = run_losses(summary.run_dir)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_training_matches_plain_on_cuda(tiny_llama_dir, copy_task_file, tmp_path):
    losses = {}
    for fast in (False, True):
        recipe = tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / f"fast-{fast}", device="cuda",
                             model={"path": str(tiny_llama_dir), "fast": fast},
                             train={"max_steps": 5, "offload_activations": fast})
        losses[fast] = run_losses(api.train(recipe, progress=False).run_dir)
    # bf16 weights: the fused kernels round in other places than the plain path (the LoRA branch is
    # bf16 here, float32 there), so per-step losses agree to bf16 precision only.
    for p, f in zip(losses[False], losses[True]):
        assert f == pytest.approx(p, rel=2e-2)


def test_a_copy_of_a_patched_and_wrapped_model_stays_patched_and_wrapped():
    from deftune.fast_path.offload import offloaded_layer, wrap_decoder_layers

    model = lora_model("llama")
    counts = apply_fast_path(model, log=lambda _msg: None)
    wrap_decoder_layers(model, mlp_layers=1)
    twin = copy.deepcopy(model)
    assert is_fast(twin) and fast_counts(twin) == counts
    assert offloaded_layer(twin.model.layers[0]) is not None
    twin.train()
    loss, _, grads = loss_and_grads(twin, make_batch())
    assert loss == loss and grads  # finite, and the copy's adapters get gradients
