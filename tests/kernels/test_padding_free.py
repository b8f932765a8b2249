"""Padding-free packing (``data.padding_free``): one row per micro-batch, no pad tokens, attention kept
inside each example (deftune.kernels.varlen), on tiny seeded models of every fast-path family."""

from __future__ import annotations

import copy
import json
from itertools import pairwise
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_recipe

from deftune import api
from deftune.adapters.lora.model import attach_lora, lora_modules
from deftune.data.collate import batches, pack_examples, padfree_collate
from deftune.data.tokenize import Example
from deftune.errors import DeftuneError
from deftune.kernels import varlen
from deftune.fast_path.patch import apply_fast_path
from deftune.training.loss import response_loss_sum

pytestmark = pytest.mark.usefixtures("one_thread")

DENSE = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 128, "vocab_size": 96,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}


@pytest.fixture(autouse=True)
def _reference_path_on_cpu(monkeypatch):
    # The model-level tests run the kernels' PyTorch references on CPU (as users get there).
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")


def _model(family: str, **extra):
    torch.manual_seed(0)
    configs = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "qwen3": transformers.Qwen3Config, "mistral": transformers.MistralConfig}
    kw = {"head_dim": 8} if family == "qwen3" else {}
    model = transformers.AutoModelForCausalLM.from_config(configs[family](**DENSE, **kw, **extra))
    model.config._attn_implementation = "sdpa"
    attach_lora(model, "all-linear", "all", rank=4, alpha=8, dropout=0.0)
    for module in lora_modules(model).values():
        torch.nn.init.normal_(module.lora_B.weight, std=0.1)
    apply_fast_path(model, log=lambda _: None)
    return model.train()


def _examples(lengths, seed=3):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, 96, (n,), generator=gen).tolist()
        labels = [-100] * (n // 2) + ids[n // 2:]
        out.append(Example(input_ids=ids, labels=labels, source=f"ex{i}"))
    return out


def test_padfree_collate_lays_examples_end_to_end():
    exs = _examples([5, 3, 4])
    batch = padfree_collate([[exs[0], exs[1]], [exs[2]]])
    assert batch["input_ids"].shape == (1, 12)
    assert batch["cu_seqlens"].tolist() == [0, 5, 8, 12] and batch["cu_seqlens"].dtype == torch.int32
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]
    assert batch["input_ids"][0].tolist() == exs[0].input_ids + exs[1].input_ids + exs[2].input_ids
    labels = batch["labels"][0].tolist()
    assert [labels[i] for i in (0, 5, 8)] == [-100, -100, -100]  # no example predicts its neighbour
    assert labels[5 + 2] == exs[1].labels[2]
    # Same packs per micro-batch as padded packing, and no pad token anywhere.
    exs = _examples([9, 7, 3, 12, 5, 8, 2])
    padded = batches(exs, 2, 0, seed=1, epoch=0, packing=True, max_length=16)
    free = batches(exs, 2, 0, seed=1, epoch=0, packing=True, max_length=16, padding_free=True)
    assert len(free) == len(padded)
    for p, f in zip(padded, free):
        assert int((p["labels"] != -100).sum()) == int((f["labels"] != -100).sum())
    assert sum(b["input_ids"].numel() for b in free) == sum(len(e.input_ids) for e in exs)


def _separate_and_together(model, exs):
    """Logits of each example run alone, and of the padding-free row, split back per example."""
    row = padfree_collate([exs])
    inputs = {"input_ids": row["input_ids"], "position_ids": row["position_ids"],
              "attention_mask": varlen.segment_mask(row["cu_seqlens"])}
    together = model(**inputs, use_cache=False).logits[0]
    bounds = row["cu_seqlens"].tolist()
    alone = [model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0] for e in exs]
    return [together[a:b] for a, b in pairwise(bounds)], alone


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_padding_free_row_equals_each_example_alone(family):
    """Every example's logits in the shared row equal its logits run alone: nothing leaks across the
    boundaries and positions restart."""
    model = _model(family)
    with torch.no_grad():
        parts, alone = _separate_and_together(model, _examples([6, 11, 1, 7]))
    for got, want in zip(parts, alone):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sliding_window_inside_a_long_example():
    """Mistral with a 4-token window: an 11-token example gets the banded mask, as when run alone."""
    model = _model("mistral", sliding_window=4)
    with torch.no_grad():
        parts, alone = _separate_and_together(model, _examples([11, 3, 6]))
    for got, want in zip(parts, alone):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("checkpointing", ["none", "transformers", "offloaded"])
def test_padding_free_loss_and_gradients_equal_padded_packing(checkpointing):
    """Same examples: loss sum and every LoRA gradient equal the padded, block-masked packed batch's (also
    when layers are recomputed under checkpointing, where the boundaries come back through the mask)."""
    model = _model("llama")
    other = copy.deepcopy(model)
    if checkpointing == "transformers":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing == "offloaded":
        from deftune.fast_path.offload import wrap_decoder_layers

        wrap_decoder_layers(model, mlp_layers=1)
    exs = _examples([6, 9, 4, 12, 3])
    packs = pack_examples(exs, 16)
    free = padfree_collate(packs)
    from deftune.data.collate import pack_collate

    padded = pack_collate(packs, 0, 16)
    results = []
    for m, batch in ((model, free), (other, padded)):
        m.zero_grad(set_to_none=True)
        loss, n = response_loss_sum(m, batch)
        loss.backward()
        results.append((float(loss.detach()), n, {k: p.grad.clone() for k, p in m.named_parameters()
                                                   if p.requires_grad}))
    (lf, nf, gf), (lp, np_, gp) = results
    assert nf == np_ and lf == pytest.approx(lp, rel=1e-5)
    for name in gp:
        torch.testing.assert_close(gf[name], gp[name], atol=1e-5, rtol=1e-4, msg=name)


def test_padding_free_is_checked(tiny_llama_dir, copy_task_file, tmp_path):
    from deftune.config import recipe_from_dict

    with pytest.raises(DeftuneError, match="data.padding_free needs data.packing: true"):
        recipe_from_dict({"data": {"padding_free": True}})
    recipe = tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / "run", device="cpu",
                         data={"packing": True, "padding_free": True, "max_length": 64})
    with pytest.raises(DeftuneError, match="data.padding_free needs model.fast: true"):
        api.train(recipe, progress=False)


def test_padding_free_training_matches_packing(tiny_llama_dir, copy_task_file, tmp_path):
    """End to end through the recipe: the per-step losses of padding-free and padded packing agree."""
    runs = {}
    for free in (False, True):
        recipe = tiny_recipe(tiny_llama_dir, copy_task_file, tmp_path / f"free-{free}", device="cpu",
                             model={"path": str(tiny_llama_dir), "fast": True},
                             data={"packing": True, "padding_free": free, "max_length": 64},
                             train={"max_steps": 4})
        summary = api.train(recipe, progress=False)
        rows = [json.loads(x) for x in (Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()]
        runs[free] = [r["loss"] for r in rows if "loss" in r]
    assert len(runs[True]) == len(runs[False]) == 4
    for a, b in zip(runs[True], runs[False]):
        assert a == pytest.approx(b, rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_kernel_matches_per_example_on_cuda(dtype):
    """torch's varlen FlashAttention (when this torch has a usable one) == per-example SDPA."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, 300, 64, device="cuda", generator=gen).to(dtype) for h in (8, 2, 2))
    mask = varlen.segment_mask(torch.tensor([0, 100, 101, 257, 300]))
    got = varlen.varlen_causal_attention(q, k, v, mask, 0.125)
    want = varlen._per_example(q, k, v, [0, 100, 101, 257, 300], 0.125, None)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    if varlen._torch_varlen()[0] is not None:  # this torch ships varlen_attn: it must have been used
        results = [ok_why for key, ok_why in varlen._CHECKED.items() if dtype in key]
        assert results and all(ok for ok, _ in results), results


def _fake_varlen(style):
    """Stand-ins with the signatures torch has shipped (2.10: is_causal, no scale/GQA; 2.11: window_size +
    scale; 2.12: + enable_gqa), computing the same thing per example with SDPA on [T, H, D] inputs."""

    def compute(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=None, gqa=False):
        assert cu_seq_q is cu_seq_k and cu_seq_q.dtype == torch.int32
        assert max_q == max_k == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
        assert gqa or key.shape[1] == query.shape[1]
        bounds = cu_seq_q.tolist()
        out = varlen._per_example(query.transpose(0, 1)[None], key.transpose(0, 1)[None],
                                  value.transpose(0, 1)[None], bounds, scale, None)
        return out[0]

    if style == "2.10":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            assert is_causal
            return compute(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)
    elif style == "2.11":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1)):
            assert window_size == (-1, 0)
            return compute(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale)
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None,
                        num_splits=None):
            assert window_size == (-1, 0)
            return compute(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, enable_gqa)
    return varlen_attn


@pytest.mark.parametrize("style", ["2.10", "2.11", "2.12"])
def test_varlen_call_matches_per_example_for_each_torch_signature(style):
    """The call into torch's varlen kernel (packing to [T, H, D], GQA by repeat where the kernel lacks it,
    causal and scale arguments as each release names them) gives the per-example result."""
    fn = _fake_varlen(style)
    info = varlen.varlen_call_info(fn)
    assert isinstance(info, dict)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, 30, 16) for h in (4, 2, 2))
    bounds = [0, 9, 10, 30]
    cu = torch.tensor(bounds, dtype=torch.int32)
    got = varlen._run_varlen(fn, info, q, k, v, cu, 20, 0.25)
    want = varlen._per_example(q, k, v, bounds, 0.25 if info["scale"] else 16 ** -0.5, None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_varlen_call_info_refuses_an_unknown_signature():
    def varlen_attn(q, k, v, cu):
        return q

    assert "not the expected signature" in varlen.varlen_call_info(varlen_attn)
