"""Padding-free packed attention (``data.padding_free``): causal attention inside each example of a row.

A padding-free batch is one row of examples back to back, no pad tokens (``data.collate.padfree_collate``),
described by ``cu_seqlens`` = [0, n_1, n_1 + n_2, ...]. Every op of a decoder layer but attention acts
per token, so only attention needs the boundaries: for example e with tokens [c_e, c_{e+1}),

    out_t = softmax(q_t K_e^T / sqrt(d) + causal) V_e,   K_e, V_e = rows [c_e, t] of K and V

(packing without cross-contamination, Krell et al. 2021, arXiv:2107.02027). Nothing is computed for pad
tokens and no T x T mask is built. Two implementations, the same values:

- CUDA, bf16/fp16, no sliding window in play: torch's variable-length FlashAttention
  (``torch.nn.attention.varlen.varlen_attn``; FlashAttention-2, Dao 2023, arXiv:2307.08691) over all
  examples in one launch. Its signature has changed across torch releases, so it is used only when the
  arguments it needs are there, and only after a one-off check against the per-example path on a small
  input (else that path is used and the log says why).
- everywhere else: scaled_dot_product_attention per example (causal; with a sliding window longer
  examples get the window's banded mask, as transformers' ``sliding_window`` means it: a query sees keys
  fewer than W positions back).

The boundaries reach each attention module (also when a checkpointed layer is recomputed) as its
``attention_mask`` argument: a 4-D int32 CPU tensor [1, 1, 1, n + 1] holding ``cu_seqlens``
(:func:`segment_mask`). transformers hands a 4-D mask through unchanged; real masks are bool or float,
so the int32 dtype identifies it.
"""

from __future__ import annotations

import functools
import inspect
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["is_segment_mask", "segment_mask", "varlen_causal_attention"]


def segment_mask(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The ``attention_mask`` stand-in that carries ``cu_seqlens`` (int32, CPU) to the attention modules."""
    return cu_seqlens.to("cpu", torch.int32).reshape(1, 1, 1, -1)


def is_segment_mask(mask) -> bool:
    return isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.dtype == torch.int32 \
        and mask.shape[:3] == (1, 1, 1)


def _bounds(mask: torch.Tensor) -> list[int]:
    return mask.reshape(-1).tolist()  # a CPU tensor: no device sync


def _per_example(q, k, v, bounds, scaling, window):
    """q [1, Hq, T, D], k/v [1, Hkv, T, D] -> [1, T, Hq, D], one SDPA call per example."""
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for start, end in pairwise(bounds):
        if end <= start:
            continue
        qs, ks, vs = q[:, :, start:end], k[:, :, start:end], v[:, :, start:end]
        n = end - start
        if window is not None and n > window:
            pos = torch.arange(n, device=q.device)
            keep = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
            out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=keep, scale=scaling, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling, enable_gqa=gqa)
        outs.append(out)
    return torch.cat(outs, dim=2).transpose(1, 2)


@functools.lru_cache(maxsize=1)
def _torch_varlen():
    """(callable, call info) of torch's varlen FlashAttention, or (None, why not)."""
    try:
        # absent from older torch: probed when padding-free attention is used
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as exc:
        return None, f"torch {torch.__version__} has no torch.nn.attention.varlen ({exc})"
    info = varlen_call_info(varlen_attn)
    return (varlen_attn, info) if isinstance(info, dict) else (None, info)


def varlen_call_info(fn) -> dict | str:
    """How to call ``varlen_attn`` as this torch defines it: causal as ``window_size=(-1, 0)`` (2.11+) or
    ``is_causal=True`` (2.9/2.10), whether it takes ``scale`` and ``enable_gqa``; or why it cannot be used."""
    params = inspect.signature(fn).parameters
    names = ("query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k")
    if list(params)[: len(names)] != list(names):
        return f"varlen_attn{inspect.signature(fn)} is not the expected signature"
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return "varlen_attn takes neither window_size nor is_causal"
    # Older releases (2.9/2.10) take is_causal and no scale (always 1/sqrt(D)) and no enable_gqa.
    return {**causal, "gqa": "enable_gqa" in params, "scale": "scale" in params}


_CHECKED: dict = {}


def _varlen_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """One check per (device, dtype): torch's kernel against the per-example path on a tiny input."""
    key = (str(device), dtype)
    if key not in _CHECKED:
        fn, info = _torch_varlen()
        if fn is None:
            _CHECKED[key] = (False, info)
        else:
            gen = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(1, h, 24, 64, device=device, generator=gen).to(dtype) for h in (4, 2, 2))
            bounds = [0, 7, 24]  # scale 1/8 = 1/sqrt(64): valid with or without a scale argument
            cu = torch.tensor(bounds, dtype=torch.int32, device=device)
            try:
                with torch.no_grad():
                    want = _per_example(q, k, v, bounds, 0.125, None)
                    got = _run_varlen(fn, info, q, k, v, cu, 17, 0.125)
                err = float((got.float() - want.float()).abs().max())
                _CHECKED[key] = (err < 2e-2, f"varlen_attn differs from per-example SDPA by {err:.3g}")
            except Exception as exc:  # noqa: BLE001 -- a kernel that cannot run here: the per-example path is still right
                _CHECKED[key] = (False, f"varlen_attn failed: {type(exc).__name__}: {exc}")
        if not _CHECKED[key][0]:
            print(f"padding-free attention: per-example SDPA ({_CHECKED[key][1]})")
    return _CHECKED[key][0]


# A padding-free batch's mask -> its bounds on the GPU (weak keys: gone with the batch).
_DEVICE_BOUNDS = WeakTensorKeyDictionary()


def _device_bounds(mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``cu_seqlens`` on the GPU, copied once per batch (cached on the mask object, which every layer and
    every recompute receives) from pinned memory without a host sync."""
    cached = _DEVICE_BOUNDS.get(mask)
    if cached is None or cached.device != device:
        cached = mask.reshape(-1).pin_memory().to(device, non_blocking=True)
        _DEVICE_BOUNDS[mask] = cached
    return cached


def _run_varlen(fn, info, q, k, v, cu, longest, scaling):
    qv = q[0].transpose(0, 1).contiguous()  # [T, Hq, D]
    kv, vv = k[0].transpose(0, 1), v[0].transpose(0, 1)
    kwargs = {key: val for key, val in info.items() if key not in ("gqa", "scale")}
    if info["scale"]:
        kwargs["scale"] = scaling
    if q.shape[1] != k.shape[1]:
        if info["gqa"]:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            kv, vv = kv.repeat_interleave(rep, dim=1), vv.repeat_interleave(rep, dim=1)
    out = fn(qv, kv.contiguous(), vv.contiguous(), cu, cu, longest, longest, **kwargs)
    return out.unsqueeze(0)  # [1, T, Hq, D]


def _scale_supported(scaling: float, head_dim: int) -> bool:
    fn, info = _torch_varlen()
    return fn is not None and (info["scale"] or abs(scaling - head_dim ** -0.5) < 1e-9 * max(1.0, scaling))


def varlen_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                            scaling: float, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention within each example of a padding-free row (module docstring).

    q [1, Hq, T, D], k/v [1, Hkv, T, D] (after RoPE), ``mask`` from :func:`segment_mask`;
    returns [1, T, Hq, D] like transformers' attention functions."""
    bounds = _bounds(mask)
    longest = max(b - a for a, b in pairwise(bounds))
    window_applies = sliding_window is not None and longest > sliding_window
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and not window_applies \
            and _scale_supported(scaling, q.shape[-1]) and _varlen_ok(q.device, q.dtype):
        fn, info = _torch_varlen()
        return _run_varlen(fn, info, q, k, v, _device_bounds(mask, q.device), longest, scaling)
    return _per_example(q, k, v, bounds, scaling, sliding_window)
