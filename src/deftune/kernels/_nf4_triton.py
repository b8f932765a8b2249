"""Triton kernel for NF4 dequantization (see :mod:`deftune.kernels.nf4` for the format).

One program reads ``BLOCK`` packed bytes, splits each into its two nibbles, looks both up in the 16-entry
code book (an L1-resident gather), multiplies by the block's absmax and writes the pair of outputs
interleaved, so every byte of codes is read once and every output written once.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from deftune.kernels._launch import fast_launch
from deftune.kernels.nf4 import BLOCK_SIZE, nf4_code_book

_BYTES_PER_PROGRAM = 1024


@triton.jit
def _store_values(out_ptr, offsets, values, mask, OUT_BF16: tl.constexpr):
    if OUT_BF16:
        # float32 -> bfloat16 by hand, round to nearest even on the bit pattern: the interpreter's own
        # cast truncates, and the tests compare these kernels with the reference bit for bit. (Finite
        # values only; NF4 * absmax is always finite.)
        bits = values.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        tl.store(out_ptr + offsets, (bits >> 16).to(tl.int16), mask=mask)
    else:
        tl.store(out_ptr + offsets, values.to(out_ptr.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _nf4_dequantize_kernel(packed_ptr, absmax_ptr, codes_ptr, scale_ptr, mean_ptr, code_book_ptr, out_ptr,
                           numel, BLOCK: tl.constexpr, QBLOCK: tl.constexpr, ABLOCK: tl.constexpr,
                           DOUBLE: tl.constexpr, OUT_BF16: tl.constexpr):
    # DOUBLE: the block's absmax is rebuilt from its int8 code, k * (d / 127) + m (codes/scale/mean);
    # otherwise read from absmax_ptr (float32). div_rn: the IEEE division PyTorch's reference does.
    byte = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    first = 2 * byte  # index of the element in the byte's high nibble
    in_range = first < numel
    packed = tl.load(packed_ptr + byte, mask=in_range, other=0).to(tl.int32)
    high = tl.load(code_book_ptr + (packed >> 4))
    low = tl.load(code_book_ptr + (packed & 0xF))
    # QBLOCK is even, so both elements of a byte share one absmax.
    block = first // QBLOCK
    if DOUBLE:
        k = tl.load(codes_ptr + block, mask=in_range, other=0).to(tl.float32)
        step = tl.math.div_rn(tl.load(scale_ptr + block // ABLOCK, mask=in_range, other=0.0), 127.0)
        scale = k * step + tl.load(mean_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=in_range, other=0.0)
    values = tl.interleave(high * scale, low * scale)
    offsets = tl.interleave(first, first + 1)
    _store_values(out_ptr, offsets, values, offsets < numel, OUT_BF16)


@fast_launch
@triton.jit
def _nf4_dequantize_double_rows_kernel(packed_ptr, codes_ptr, scale_ptr, mean_ptr, pair_lut_ptr, out_ptr,
                                       numel, n_blocks, ROWS: tl.constexpr, QBLOCK: tl.constexpr,
                                       ABLOCK: tl.constexpr, OUT_BF16: tl.constexpr):
    # A program is ROWS quantization blocks laid out as [ROWS, QBLOCK / 2] bytes: each block's absmax is
    # loaded once and broadcast along its row (not once per element), and one 64-bit gather from a 256-entry
    # table gives both nibbles' code values of a byte (not two gathers from the 16-entry book).
    HALF: tl.constexpr = QBLOCK // 2
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = row < n_blocks
    byte = row[:, None] * HALF + tl.arange(0, HALF)[None, :]
    first = 2 * byte
    in_range = first < numel
    packed = tl.load(packed_ptr + byte, mask=in_range, other=0).to(tl.int32)
    pair = tl.load(pair_lut_ptr + packed)
    high = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    low = ((pair >> 32) & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    k = tl.load(codes_ptr + row, mask=row_ok, other=0).to(tl.float32)
    step = tl.math.div_rn(tl.load(scale_ptr + row // ABLOCK, mask=row_ok, other=0.0), 127.0)
    scale = (k * step + tl.load(mean_ptr))[:, None]
    values = tl.interleave(high * scale, low * scale)
    offsets = tl.interleave(first, first + 1)
    _store_values(out_ptr, offsets, values, offsets < numel, OUT_BF16)


@functools.lru_cache(maxsize=8)
def _nf4_pair_table(device) -> torch.Tensor:
    """256 int64 entries: for byte b, the float32 bits of NF4[b >> 4] (low word) and NF4[b & 15] (high)."""
    bits = nf4_code_book("cpu").view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    b = torch.arange(256)
    return (bits[b >> 4] | (bits[b & 15] << 32)).to(device)


# Which double-quantized kernel runs: "flat" (one gather per nibble, absmax per element) or "rows" (absmax
# per block row, one 64-bit table gather per byte). bench/kernels_vs_liger.py races both on the GPU.
DOUBLE_KERNEL = "flat"
_ROWS_PER_PROGRAM = 32  # 32 blocks x 32 bytes: the same 1 KiB of codes per program as the flat kernel


def dequantize_nf4_double_triton(packed: torch.Tensor, absmax_codes: torch.Tensor, absmax_scale: torch.Tensor,
                                 absmax_mean: torch.Tensor, numel: int, dtype: torch.dtype,
                                 absmax_block: int, variant: str | None = None) -> torch.Tensor:
    """:func:`deftune.kernels.nf4.dequantize_nf4_double` on the GPU (one launch);
    ``variant``: "flat" or "rows" (default :data:`DOUBLE_KERNEL`)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"NF4 dequantization writes float32, float16 or bfloat16, not {dtype}")
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    if numel == 0:
        return out
    # d / 127 is divided in the kernel with IEEE rounding (div_rn), as the reference divides, so the
    # kernel's only possible rounding difference is an FMA in k * step + m.
    scale = absmax_scale.float()
    is_bf16 = dtype == torch.bfloat16
    out_view = out.view(torch.int16) if is_bf16 else out
    if (variant or DOUBLE_KERNEL) == "rows":
        n_blocks = -(-numel // BLOCK_SIZE)
        _nf4_dequantize_double_rows_kernel[(triton.cdiv(n_blocks, _ROWS_PER_PROGRAM),)](
            packed, absmax_codes, scale, absmax_mean.float(), _nf4_pair_table(packed.device), out_view, numel,
            n_blocks, ROWS=_ROWS_PER_PROGRAM, QBLOCK=BLOCK_SIZE, ABLOCK=absmax_block, OUT_BF16=is_bf16,
        )
        return out
    grid = (triton.cdiv((numel + 1) // 2, _BYTES_PER_PROGRAM),)
    _nf4_dequantize_kernel[grid](
        packed, scale, absmax_codes, scale, absmax_mean.float(), nf4_code_book(packed.device), out_view,
        numel, BLOCK=_BYTES_PER_PROGRAM, QBLOCK=BLOCK_SIZE, ABLOCK=absmax_block, DOUBLE=True,
        OUT_BF16=is_bf16,
    )
    return out


def dequantize_nf4_triton(packed: torch.Tensor, absmax: torch.Tensor, numel: int,
                          dtype: torch.dtype) -> torch.Tensor:
    """Flat ``NF4[q_i] * absmax[i // 64]`` of ``dtype`` (float32, float16 or bfloat16) from the kernel."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"NF4 dequantization writes float32, float16 or bfloat16, not {dtype}")
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    if numel == 0:
        return out
    n_bytes = (numel + 1) // 2
    grid = (triton.cdiv(n_bytes, _BYTES_PER_PROGRAM),)
    is_bf16 = dtype == torch.bfloat16
    absmax = absmax.float().contiguous()
    _nf4_dequantize_kernel[grid](
        packed.contiguous(), absmax, absmax, absmax, absmax, nf4_code_book(packed.device),
        out.view(torch.int16) if is_bf16 else out, numel,
        BLOCK=_BYTES_PER_PROGRAM, QBLOCK=BLOCK_SIZE, ABLOCK=1, DOUBLE=False, OUT_BF16=is_bf16,
    )
    return out
