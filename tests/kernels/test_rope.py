"""RoPE Triton kernel vs the PyTorch reference: q/k outputs and dq/dk, GQA, strided HF layout."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, DTYPES, assert_close, gpu_only, leaf, seeded_triton_path  # noqa: F401

from deftune.kernels.rope import rope_qk, rope_qk_reference


def _cos_sin(batch: int, seq: int, head_dim: int, dtype: torch.dtype, base: float = 10000.0):
    """cos/sin [batch, seq, head_dim] as HF's LlamaRotaryEmbedding builds them (frequencies repeated)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=DEVICE).float() / head_dim)
    positions = torch.stack([torch.arange(seq, device=DEVICE) + 3 * b for b in range(batch)]).float()
    freqs = positions[..., None] * inv_freq  # [batch, seq, head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _compare(batch, n_q_heads, n_k_heads, seq, head_dim, dtype, hf_strides: bool, cos_batch: int | None = None):
    if hf_strides:  # projections come out [B, T, H, D] and are viewed as [B, H, T, D] without a copy
        q = torch.randn(batch, seq, n_q_heads, head_dim, device=DEVICE).to(dtype).transpose(1, 2)
        k = torch.randn(batch, seq, n_k_heads, head_dim, device=DEVICE).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(batch, n_q_heads, seq, head_dim, device=DEVICE).to(dtype)
        k = torch.randn(batch, n_k_heads, seq, head_dim, device=DEVICE).to(dtype)
    cos, sin = _cos_sin(cos_batch or batch, seq, head_dim, dtype)
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    qa, ka, qb, kb = leaf(q), leaf(k), leaf(q), leaf(k)
    q_out, k_out = rope_qk(qa, ka, cos, sin)
    q_ref, k_ref = rope_qk_reference(qb, kb, cos, sin)
    assert_close(q_out, q_ref, dtype)
    assert_close(k_out, k_ref, dtype)
    torch.autograd.backward((q_out, k_out), (dq_out, dk_out))
    torch.autograd.backward((q_ref, k_ref), (dq_out, dk_out))
    assert_close(qa.grad, qb.grad, dtype)
    assert_close(ka.grad, kb.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, n_q_heads, n_k_heads, seq, head_dim",
    [(2, 6, 2, 13, 10), (1, 3, 3, 5, 16), (2, 4, 1, 7, 6)],  # GQA, MHA, MQA; odd T, non-power-of-2 D
)
def test_rope_qk_matches_reference(batch, n_q_heads, n_k_heads, seq, head_dim, dtype):
    _compare(batch, n_q_heads, n_k_heads, seq, head_dim, dtype, hf_strides=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_qk_hf_strided_layout(dtype):
    _compare(2, 6, 2, 13, 10, dtype, hf_strides=True)


def test_rope_qk_cos_sin_shared_across_batch():
    # position_ids of shape [1, T] give cos/sin [1, T, D], broadcast over the batch
    _compare(3, 4, 2, 9, 8, torch.float32, hf_strides=True, cos_batch=1)


def test_rope_qk_backward_is_rotation_by_minus_sin():
    q = torch.randn(1, 2, 5, 8, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 1, 5, 8, device=DEVICE, requires_grad=True)
    cos, sin = _cos_sin(1, 5, 8, torch.float32)
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    torch.autograd.backward(rope_qk(q, k, cos, sin), (dq_out, dk_out))
    want_dq, want_dk = rope_qk_reference(dq_out, dk_out, cos, -sin)
    assert_close(q.grad, want_dq, torch.float32)
    assert_close(k.grad, want_dk, torch.float32)


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_qk_real_shape_gpu(dtype):
    _compare(4, 32, 8, 2048, 128, dtype, hf_strides=True)  # Llama-3-8B attention, 2k context
