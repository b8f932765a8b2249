"""Tiny seeded models and batches shared by the fast-path tests (kept out of conftest.py, whose module
name is taken).

On CPU these tests run the kernels' PyTorch references: they check the *wiring* (what is patched, that
the patched model computes what the plain one does, that training and saving are unchanged); the
kernels' own tests (tests/kernels) check Triton against the references. On a GPU the Triton kernels run.

A test module uses the fixture below by importing it (``from fast_models import reference_path_on_cpu``)
and sets ``pytestmark = pytest.mark.usefixtures("one_thread")``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from deftune.adapters.lora.model import attach_lora, lora_modules
from deftune.training.loss import response_loss_sum

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DENSE = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 128, "vocab_size": 96,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}
FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]


@pytest.fixture(autouse=True)
def reference_path_on_cpu(monkeypatch):
    """On CPU the fast path must run the PyTorch references (the CPU path users get), not Triton's
    interpreter (which the test session turns on for the kernel tests), also far too slow for training."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    yield


def family_config(family: str, **extra):
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


def lora_model(family: str, dropout: float = 0.0, seed: int = 0):
    """A seeded tiny model with LoRA on every projection and a non-zero update (B random)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(family_config(family))
    attach_lora(model, "all-linear", "all", rank=4, alpha=8, dropout=dropout)
    for module in lora_modules(model).values():
        torch.nn.init.normal_(module.lora_B.weight, std=0.1)
    return model.to(DEVICE)


def make_batch(vocab: int = 96, rows: int = 3, length: int = 13):
    ids = torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :5] = -100  # prompt tokens
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # one padded row
    labels[0, -3:] = -100
    return {k: v.to(DEVICE) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def assert_same_step(reference, other, batch, rel, atol, rtol):
    """``other`` gives ``reference``'s loss (within ``rel``) and every trainable gradient (atol/rtol)."""
    loss_r, _, grads_r = loss_and_grads(reference, batch)
    loss_o, _, grads_o = loss_and_grads(other, batch)
    assert loss_o == pytest.approx(loss_r, rel=rel)
    for name in grads_r:
        torch.testing.assert_close(grads_o[name], grads_r[name], atol=atol, rtol=rtol, msg=name)


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss, n = response_loss_sum(model, batch)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), n, grads


def run_losses(run_dir) -> list[float]:
    """The per-step training losses a run wrote to its metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]
