"""Triton kernel for NF4 dequantization (see :mod:`deftune.kernels.nf4` for the format).

One program reads ``BLOCK`` packed bytes, splits each into its two nibbles, looks both up in the 16-entry
code book (an L1-resident gather), multiplies by the block's absmax and writes the pair of outputs
interleaved, so every byte of codes is read once and every output written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deftune.kernels import triton_interpreting

_BYTES_PER_PROGRAM = 1024
# A lane per output element, 1024 bytes and 2 warps per program: the fastest layout of the sweep in
# bench/kernels_vs_liger.py on an H200 (figures in docs/performance.md).
_NUM_WARPS = 2
_ELEMENTS = True  # a lane per output element (contiguous stores); False: a lane per byte (interleaved pairs)


@triton.jit
def _store_values(out_ptr, offsets, values, mask, OUT_BF16: tl.constexpr, BY_HAND: tl.constexpr):
    # OUT_BF16: out_ptr is the bf16 output viewed as int16.
    if OUT_BF16 and BY_HAND:
        # float32 -> bfloat16 by hand, round to nearest even on the bit pattern: the interpreter's own
        # cast truncates, and the tests compare these kernels with the reference bit for bit. (Finite
        # values only; NF4 * absmax is always finite.)
        bits = values.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        tl.store(out_ptr + offsets, (bits >> 16).to(tl.int16), mask=mask)
    elif OUT_BF16:
        # Compiled: the hardware conversion (round to nearest even, the same result in one instruction).
        tl.store(out_ptr + offsets, values.to(tl.bfloat16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + offsets, values.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_program(pid, packed_ptr, absmax_ptr, codes_ptr, scale_ptr, mean_ptr, code_book_ptr, out_ptr,
                        numel, BLOCK: tl.constexpr, QBLOCK: tl.constexpr, ABLOCK: tl.constexpr,
                        DOUBLE: tl.constexpr, OUT_BF16: tl.constexpr, BY_HAND: tl.constexpr,
                        ONE_SCALE: tl.constexpr, ELEMENTS: tl.constexpr):
    # A program writes the 2 * BLOCK outputs of BLOCK packed bytes. ELEMENTS: one lane per output (each
    # picks its nibble; the stores are contiguous per thread, each byte is read twice through the cache);
    # else one lane per byte, both nibbles looked up and interleaved.
    # DOUBLE: the block's absmax is rebuilt from its int8 code, k * (d / 127) + m (codes/scale/mean);
    # otherwise read from absmax_ptr (float32). div_rn: the IEEE division PyTorch's reference does.
    # ONE_SCALE: the program's 2 * BLOCK elements lie inside one group of ABLOCK blocks (the launcher
    # checks), so d / 127 is one scalar division per program instead of one per element.
    if ELEMENTS:
        elem = pid * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
        in_range = elem < numel
        packed = tl.load(packed_ptr + elem // 2, mask=in_range, other=0).to(tl.int32)
        shift = (4 - 4 * (elem % 2)).to(tl.int32)  # even elements sit in the high nibble
        code_value = tl.load(code_book_ptr + ((packed >> shift) & 0xF))
        block = elem // QBLOCK
    else:
        byte = pid * BLOCK + tl.arange(0, BLOCK)
        first = 2 * byte  # index of the element in the byte's high nibble
        in_range = first < numel
        packed = tl.load(packed_ptr + byte, mask=in_range, other=0).to(tl.int32)
        high = tl.load(code_book_ptr + (packed >> 4))
        low = tl.load(code_book_ptr + (packed & 0xF))
        # QBLOCK is even, so both elements of a byte share one absmax.
        block = first // QBLOCK
    if DOUBLE:
        k = tl.load(codes_ptr + block, mask=in_range, other=0).to(tl.float32)
        if ONE_SCALE:
            step = tl.math.div_rn(tl.load(scale_ptr + (pid * 2 * BLOCK) // (QBLOCK * ABLOCK)), 127.0)
        else:
            step = tl.math.div_rn(tl.load(scale_ptr + block // ABLOCK, mask=in_range, other=0.0), 127.0)
        scale = k * step + tl.load(mean_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=in_range, other=0.0)
    if ELEMENTS:
        _store_values(out_ptr, elem, code_value * scale, in_range, OUT_BF16, BY_HAND)
    else:
        values = tl.interleave(high * scale, low * scale)
        offsets = tl.interleave(first, first + 1)
        _store_values(out_ptr, offsets, values, offsets < numel, OUT_BF16, BY_HAND)


@triton.jit
def _nf4_dequantize_kernel(packed_ptr, absmax_ptr, codes_ptr, scale_ptr, mean_ptr, code_book_ptr, out_ptr,
                           numel, BLOCK: tl.constexpr, QBLOCK: tl.constexpr, ABLOCK: tl.constexpr,
                           DOUBLE: tl.constexpr, OUT_BF16: tl.constexpr, BY_HAND: tl.constexpr,
                           ONE_SCALE: tl.constexpr, ELEMENTS: tl.constexpr):
    _dequantize_program(tl.program_id(0).to(tl.int64), packed_ptr, absmax_ptr, codes_ptr, scale_ptr, mean_ptr,
                        code_book_ptr, out_ptr, numel, BLOCK, QBLOCK, ABLOCK, DOUBLE, OUT_BF16, BY_HAND,
                        ONE_SCALE, ELEMENTS)


def dequantize_nf4_double_triton(packed: torch.Tensor, absmax_codes: torch.Tensor, absmax_scale: torch.Tensor,
                                 absmax_mean: torch.Tensor, numel: int, dtype: torch.dtype,
                                 absmax_block: int, code_book: torch.Tensor, qblock: int, block: int = 0,
                                 num_warps: int = 0, elements: bool | None = None) -> torch.Tensor:
    """:func:`deftune.kernels.nf4.dequantize_nf4_double` on the GPU (one launch); ``block`` (bytes per
    program), ``num_warps`` and ``elements`` (one lane per output instead of per byte) default to
    :data:`_BYTES_PER_PROGRAM` / :data:`_NUM_WARPS` / :data:`_ELEMENTS` (bench/kernels_vs_liger.py sweeps
    them)."""
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
    block = block or _BYTES_PER_PROGRAM
    grid = (triton.cdiv((numel + 1) // 2, block),)
    _nf4_dequantize_kernel[grid](
        packed, scale, absmax_codes, scale, absmax_mean.float(), code_book, out_view,
        numel, BLOCK=block, QBLOCK=qblock, ABLOCK=absmax_block, DOUBLE=True,
        OUT_BF16=is_bf16, BY_HAND=triton_interpreting(), ONE_SCALE=(qblock * absmax_block) % (2 * block) == 0,
        ELEMENTS=_ELEMENTS if elements is None else elements, num_warps=num_warps or _NUM_WARPS,
    )
    return out


def dequantize_nf4_triton(packed: torch.Tensor, absmax: torch.Tensor, numel: int, dtype: torch.dtype,
                          code_book: torch.Tensor, qblock: int) -> torch.Tensor:
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
        packed.contiguous(), absmax, absmax, absmax, absmax, code_book,
        out.view(torch.int16) if is_bf16 else out, numel,
        BLOCK=_BYTES_PER_PROGRAM, QBLOCK=qblock, ABLOCK=1, DOUBLE=False, OUT_BF16=is_bf16,
        BY_HAND=triton_interpreting(), ONE_SCALE=False, ELEMENTS=_ELEMENTS, num_warps=_NUM_WARPS,
    )
    return out
