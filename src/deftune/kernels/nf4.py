"""NF4 dequantization (QLoRA, Dettmers et al. 2023, arXiv:2305.14314), the hot path of a 4-bit base.

A weight is stored as 4-bit indices ``q_i`` into the 16-value NormalFloat code book ``NF4``, one absmax
``c_b`` per block of ``BLOCK_SIZE`` = 64 consecutive elements of the flattened (row-major) weight:

    W_i = NF4[q_i] * c_{i // 64}

Two indices share a byte, the even element in the high nibble: ``byte_j = q_{2j} << 4 | q_{2j+1}``.
The absmax ``c`` arrives here already dequantized (the second, 8-bit level of double quantization is
undone in PyTorch by :func:`deftune.models.quantize.dequantize_absmax`: it is 1/64 of the data).

:func:`dequantize_nf4` runs the Triton kernel on CUDA (or under ``TRITON_INTERPRET=1``), otherwise the
pure-PyTorch :func:`dequantize_nf4_reference`; both compute ``NF4[q] * c`` in float32 and round once to
the output dtype (round to nearest even), so they agree bit for bit.
"""

from __future__ import annotations

import functools

import torch

from deftune.kernels import use_triton

__all__ = ["NF4_CODE_VALUES", "BLOCK_SIZE", "nf4_code_book", "pack_nibbles", "unpack_nibbles",
           "absmax_from_codes", "dequantize_nf4", "dequantize_nf4_double",
           "dequantize_nf4_reference"]

# NF4 code book, the table in the QLoRA paper's Appendix E. Construction (Sec. 3 of the paper): the
# quantiles of N(0, 1) at 8 evenly spaced probabilities from delta = 0.9677083 (= (1/2)(1/32 + 1/30)
# away from each tail) to 0.5 on the positive side and 7 on the negative side, plus an exact 0, each side
# divided by its largest magnitude, so [-1, 1] is covered and 0 is represented exactly (padding and zero
# weights stay zero). tests/models/test_quantize.py re-derives them with torch.special.ndtri.
NF4_CODE_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044617, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCK_SIZE = 64


@functools.lru_cache(maxsize=8)
def nf4_code_book(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 values as a float32 tensor on ``device`` (cached: dequantization runs every forward)."""
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 16) of even length -> half as many bytes, ``codes[2j] << 4 | codes[2j+1]``."""
    if codes.numel() % 2:
        raise ValueError(f"pack_nibbles needs an even number of codes, got {codes.numel()}")
    pairs = codes.reshape(-1, 2).to(torch.uint8)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: bytes -> twice as many uint8 codes (high nibble first)."""
    return torch.stack((packed >> 4, packed & 0xF), dim=-1).reshape(-1)


def dequantize_nf4_reference(packed: torch.Tensor, absmax: torch.Tensor, numel: int,
                             dtype: torch.dtype) -> torch.Tensor:
    """``NF4[q_i] * absmax[i // 64]`` for the first ``numel`` elements, as a flat tensor of ``dtype``."""
    codes = unpack_nibbles(packed)[:numel].long()
    scale = absmax.float().repeat_interleave(BLOCK_SIZE)[:numel]
    return (nf4_code_book(packed.device)[codes] * scale).to(dtype)


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, numel: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """Flat dequantized weight ``NF4[q_i] * absmax[i // 64]`` (``numel`` elements of ``dtype``).

    Triton on CUDA or under ``TRITON_INTERPRET=1``; the PyTorch reference otherwise. Equal bit for bit.
    """
    if use_triton(packed, absmax):
        # the Triton module imports triton (optional extra `kernels`)
        from deftune.kernels._nf4_triton import dequantize_nf4_triton

        return dequantize_nf4_triton(packed, absmax, numel, dtype, nf4_code_book(packed.device), BLOCK_SIZE)
    return dequantize_nf4_reference(packed, absmax, numel, dtype)


def dequantize_nf4_double(packed: torch.Tensor, absmax_codes: torch.Tensor, absmax_scale: torch.Tensor,
                          absmax_mean: torch.Tensor, numel: int, dtype: torch.dtype,
                          absmax_block: int = 256) -> torch.Tensor:
    """:func:`dequantize_nf4` of a double-quantized weight: the absmax of block b is
    ``c'_b = k_b * (d_{b // absmax_block} / 127) + m`` (int8 codes k, float32 scales d and mean m), undone
    inside the Triton kernel instead of by ~8 PyTorch ops per call (one 4-bit projection dequantizes three
    times a step: forward, recompute, backward). The reference path computes c' with PyTorch first.
    On a GPU the kernel may fuse ``k * step + m`` into one FMA, so c' can differ from the reference in its
    last float32 bit there; under the interpreter the two are equal bit for bit."""
    if use_triton(packed, absmax_codes):
        # the Triton module imports triton (optional extra `kernels`)
        from deftune.kernels._nf4_triton import dequantize_nf4_double_triton

        return dequantize_nf4_double_triton(packed, absmax_codes, absmax_scale, absmax_mean, numel, dtype,
                                            absmax_block, nf4_code_book(packed.device), BLOCK_SIZE)
    absmax = absmax_from_codes(absmax_codes, absmax_scale, absmax_mean, absmax_block)
    return dequantize_nf4_reference(packed, absmax, numel, dtype)


def absmax_from_codes(codes: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                      absmax_block: int = 256) -> torch.Tensor:
    """``c'_b = k_b d_{b // absmax_block} / 127 + m`` in float32: the double quantization of the absmax
    undone in PyTorch (the reference the kernels are compared with)."""
    step = (scale.float() / 127).repeat_interleave(absmax_block)[: codes.numel()]
    return codes.float() * step + mean.float()
