"""Activation offloading (``train.offload_activations``, :mod:`deftune.fast_path.offload` and
:mod:`deftune.fast_path.stash`): offloaded checkpointing keeps every gradient; a checkpointed layer's
recompute stops before the down projection; the MLP stash (``train.offload_mlp_layers`` /
``train.keep_mlp_layers``) hands gate and up back instead of recomputing them.

On CPU the host copy is a plain clone (the same checkpoint logic runs); the ``*_on_cuda`` tests use the card.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_recipe
from fast_models import (  # noqa: F401 (reference_path_on_cpu: an autouse fixture)
    assert_same_step,
    lora_model,
    loss_and_grads,
    make_batch,
    reference_path_on_cpu,
)

from deftune import api
from deftune.config import recipe_from_dict
from deftune.errors import DeftuneError
from deftune.fast_path import offload
from deftune.fast_path.patch import apply_fast_path
from deftune.kernels import lora_linear as ll
from deftune.recipes import sft
from deftune.training.loss import response_loss_sum

pytestmark = pytest.mark.usefixtures("one_thread")


def test_offload_activations_is_refused_without_a_gpu(tiny_llama_dir, copy_task_file, tmp_path):
    recipe = tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "run", device="cpu",
                         train={"offload_activations": True})
    with pytest.raises(DeftuneError, match="train.offload_activations needs a CUDA GPU"):
        sft.prepare_model(recipe, lora_model("llama").cpu(), torch.device("cpu"))
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
    plain = lora_model("llama").train()
    wrapped = copy.deepcopy(plain)
    if fast:  # each patched itself: a copy of a patched model is not registered as one (patch.is_fast)
        for model in (plain, wrapped):
            apply_fast_path(model, log=lambda _: None)
    assert offload.wrap_decoder_layers(wrapped) == 2
    batch = make_batch()
    loss_p, _, grads_p = loss_and_grads(plain, batch)
    loss_w, _, grads_w = loss_and_grads(wrapped, batch)
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
    plain = lora_model("llama").train()
    wrapped = copy.deepcopy(plain)
    if fast:  # each patched itself: a copy of a patched model is not registered as one (patch.is_fast)
        for model in (plain, wrapped):
            apply_fast_path(model, log=lambda _: None)
    assert offload.enable_offloaded_checkpointing(wrapped, torch.device("cuda")) == 2
    batch = make_batch()
    assert_same_step(plain, wrapped, batch, rel=1e-5, atol=1e-5, rtol=1e-4)


# --- recompute: early stop before the down projection, MLP stash (train.offload_mlp_layers) ---------------


def _count_calls(monkeypatch):
    """Counts of base GEMMs run (FrozenAddmm) and handed back (GivenOutput), split forward / backward."""
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
    plain = lora_model("llama").train()
    wrapped = copy.deepcopy(plain)
    for model in (plain, wrapped):  # each patched itself: a copy of a patched model is not registered as one
        apply_fast_path(model, log=lambda _: None)
    if how == "transformers":
        wrapped.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        offload.wrap_decoder_layers(wrapped)
    batch = make_batch()
    loss_p, _, grads_p = loss_and_grads(plain, batch)
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
    plain = lora_model("llama").train()
    wrapped = copy.deepcopy(plain)
    for model in (plain, wrapped):  # each patched itself: a copy of a patched model is not registered as one
        apply_fast_path(model, log=lambda _: None)
    assert offload.wrap_decoder_layers(wrapped, mlp_layers=host, resident_layers=gpu) == 2
    stashes = [offload.offloaded_layer(layer).stash for layer in wrapped.model.layers]
    assert sum(s is not None for s in stashes) == mlp_layers
    assert [s.resident for s in stashes if s is not None] == [False] * host + [True] * gpu
    batch = make_batch()
    loss_p, _, grads_p = loss_and_grads(plain, batch)
    calls = _count_calls(monkeypatch)
    loss_w, _, grads_w = loss_and_grads(wrapped, batch)
    assert calls["gemm"] == 14 + mlp_layers * 4 + (2 - mlp_layers) * 6
    assert calls["given"] == 2 * mlp_layers
    assert all(s is None or s.boxes == [] for s in stashes)  # host copies released after backward
    assert loss_w == pytest.approx(loss_p, rel=1e-6)
    for name in grads_p:
        torch.testing.assert_close(grads_w[name], grads_p[name], atol=1e-6, rtol=1e-5, msg=name)
    loss_2, _, _ = loss_and_grads(wrapped, batch)  # a second step records afresh
    assert loss_2 == pytest.approx(loss_p, rel=1e-6)


def test_mlp_stash_is_checked():
    with pytest.raises(DeftuneError, match="train.offload_mlp_layers needs train.offload_activations"):
        recipe_from_dict({"train": {"offload_mlp_layers": 2}})
    with pytest.raises(DeftuneError, match="cannot be combined"):
        recipe_from_dict({"train": {"offload_mlp_layers": 2, "offload_activations": True, "mlp_tile_tokens": 64}})
    with pytest.raises(DeftuneError, match="train.offload_mlp_layers must be >= 0"):
        recipe_from_dict({"train": {"offload_mlp_layers": -1}})
    fast = lora_model("llama")
    apply_fast_path(fast, log=lambda _: None)
    with pytest.raises(DeftuneError, match=r"train.offload_mlp_layers=3 \+ train.keep_mlp_layers=0: must be 0..2"):
        offload.wrap_decoder_layers(fast, mlp_layers=3)
    with pytest.raises(DeftuneError, match=r"train.offload_mlp_layers=1 \+ train.keep_mlp_layers=2: must be 0..2"):
        offload.wrap_decoder_layers(fast, mlp_layers=1, resident_layers=2)
    with pytest.raises(DeftuneError, match="train.keep_mlp_layers needs train.offload_activations"):
        recipe_from_dict({"train": {"keep_mlp_layers": 1}})
    with pytest.raises(DeftuneError, match="needs model.fast"):
        offload.wrap_decoder_layers(lora_model("llama"), mlp_layers=1)
    dropout = lora_model("llama", dropout=0.1)
    apply_fast_path(dropout, log=lambda _: None)
    with pytest.raises(DeftuneError, match=r"gate_proj is LoRALinear with dropout"):
        offload.wrap_decoder_layers(dropout, mlp_layers=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("host,gpu", [(2, 0), (1, 1)])
def test_mlp_stash_on_cuda(host, gpu):
    plain = lora_model("llama").train()
    wrapped = copy.deepcopy(plain)
    for model in (plain, wrapped):  # each patched itself: a copy of a patched model is not registered as one
        apply_fast_path(model, log=lambda _: None)
    offload.enable_offloaded_checkpointing(wrapped, torch.device("cuda"), mlp_layers=host, resident_layers=gpu)
    batch = make_batch()
    loss_p, _, grads_p = loss_and_grads(plain, batch)
    for _step in range(2):
        loss_w, _, grads_w = loss_and_grads(wrapped, batch)
        assert loss_w == pytest.approx(loss_p, rel=1e-5)
        for name in grads_p:
            torch.testing.assert_close(grads_w[name], grads_p[name], atol=1e-5, rtol=1e-4, msg=name)
