"""4-bit NormalFloat (NF4) base weights with double quantization, for QLoRA.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314) trains
LoRA adapters over a frozen base stored in 4 bits:

    h = dequant(W) x + s B A x

First level, per block b of 64 consecutive elements of the flattened weight [out, in]:

    c_b = max_{i in b} |W_i|,   q_i = argmin_k |W_i / c_b - NF4[k]|,   dequant(W)_i = NF4[q_i] * c_b

with NF4 the 16 normal-quantile values (:data:`deftune.kernels.nf4.NF4_CODE_VALUES`); two 4-bit codes
per byte. Second level ("double quantization", Sec. 3 of the paper): the absmax vector c is itself
quantized to 8 bits in blocks of 256 after subtracting its mean m (c > 0, so centring lets a symmetric
code use all of its range):

    d_g = max_{b in g} |c_b - m|,   k_b = round(127 (c_b - m) / d_g) (int8),   c'_b = k_b d_g / 127 + m

The paper stores k as 8-bit floats; a linear int8 code is used here (same size, simpler exact kernels).
Memory per weight: 4 + 8/64 + 32/(64*256) = 4.127 bits = 0.516 bytes, against 2 bytes in bf16.
The first-level codes are chosen against c' (the absmax dequantization will really use), so a weight
that is exactly NF4[k] * c' comes back exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from deftune.kernels.nf4 import (
    BLOCK_SIZE,
    NF4_CODE_VALUES,
    absmax_from_codes,
    dequantize_nf4_double,
    pack_nibbles,
)

ABSMAX_BLOCK_SIZE = 256

__all__ = ["NF4Linear", "quantize_nf4", "quantize_absmax", "dequantize_absmax", "ABSMAX_BLOCK_SIZE"]


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of the first-level absmax ``c``: ``(k int8, d float32 per 256, m float32)``."""
    c = absmax.float()
    mean = c.mean() if c.numel() else c.new_zeros(())
    centred = c - mean
    n_groups = -(-c.numel() // ABSMAX_BLOCK_SIZE)
    groups = torch.zeros(n_groups * ABSMAX_BLOCK_SIZE, dtype=torch.float32, device=c.device)
    groups[: c.numel()] = centred
    groups = groups.view(n_groups, ABSMAX_BLOCK_SIZE)
    scale = groups.abs().amax(dim=1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(groups / safe[:, None] * 127).clamp_(-127, 127).to(torch.int8)
    return codes.reshape(-1)[: c.numel()].contiguous(), scale, mean


def dequantize_absmax(codes: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``c'_b = k_b d_{b // 256} / 127 + m`` in float32 (shared by every dequantization path)."""
    return absmax_from_codes(codes, scale, mean, ABSMAX_BLOCK_SIZE)


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """NF4 + double quantization of ``weight`` (any shape, flattened row-major).

    Returns the buffers of :class:`NF4Linear`: ``packed_codes`` (uint8, two codes per byte, the flat
    weight zero-padded to a multiple of 64), ``absmax_codes`` (int8), ``absmax_scale`` (float32, one per
    256 blocks) and ``absmax_mean`` (float32 scalar).
    """
    flat = weight.detach().reshape(-1).float()
    n_blocks = -(-flat.numel() // BLOCK_SIZE)
    blocks = torch.zeros(n_blocks * BLOCK_SIZE, dtype=torch.float32, device=flat.device)
    blocks[: flat.numel()] = flat
    blocks = blocks.view(n_blocks, BLOCK_SIZE)
    absmax_codes, absmax_scale, absmax_mean = quantize_absmax(blocks.abs().amax(dim=1))
    absmax = dequantize_absmax(absmax_codes, absmax_scale, absmax_mean)
    # A zero c' only occurs for an all-zero block (or one rounded to zero): any code times 0 is 0 there.
    safe = torch.where(absmax != 0, absmax, torch.ones_like(absmax))
    normalised = blocks / safe[:, None]
    values = torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=flat.device)
    midpoints = (values[1:] + values[:-1]) / 2
    # Nearest code = number of midpoints below the value (values beyond +-1 clamp to the end codes).
    codes = torch.bucketize(normalised, midpoints).to(torch.uint8)
    return {
        "packed_codes": pack_nibbles(codes.reshape(-1)),
        "absmax_codes": absmax_codes,
        "absmax_scale": absmax_scale,
        "absmax_mean": absmax_mean,
    }


class _NF4LinearFunction(torch.autograd.Function):
    """``y = x dequant(W)^T`` that keeps only the 4-bit codes for backward.

    Backward re-dequantizes W to give ``dx = dy dequant(W)``; the base is frozen, so there is no dW and
    no full-precision copy of W lives between forward and backward (the point of QLoRA's memory saving).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        w = layer.dequantize()
        ctx.layer = layer
        ctx.x_dtype = x.dtype
        return torch.nn.functional.linear(x.to(w.dtype), w)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        w = ctx.layer.dequantize()
        return (grad_out.to(w.dtype) @ w).to(ctx.x_dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored as NF4 codes with double-quantized absmax.

    ``forward(x) = x dequant(W)^T + b`` (QLoRA, arXiv:2305.14314; format in the module docstring).
    The codes and scales are buffers, so ``.to(device)`` moves them and ``state_dict`` holds them; the
    bias (if any) stays a frozen parameter in the compute dtype. ``dequantize()`` gives W in
    ``compute_dtype``. Build one with :meth:`from_linear`.

    ``weight`` is deliberately not the weight: it is a one-element NaN tensor expanded (stride 0) to
    [out, in] in the compute dtype on the layer's device, so code that reads ``.weight.dtype``,
    ``.device`` or ``.shape`` (model code, LoRALinear) keeps working while any arithmetic on it shows up
    at once as NaN instead of silently using a wrong matrix. Use :meth:`dequantize` for W.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 compute_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        numel = in_features * out_features
        n_blocks = -(-numel // BLOCK_SIZE)
        n_groups = -(-n_blocks // ABSMAX_BLOCK_SIZE)
        self.register_buffer("packed_codes", torch.zeros(n_blocks * BLOCK_SIZE // 2, dtype=torch.uint8,
                                                         device=device))
        self.register_buffer("absmax_codes", torch.zeros(n_blocks, dtype=torch.int8, device=device))
        self.register_buffer("absmax_scale", torch.zeros(n_groups, dtype=torch.float32, device=device))
        self.register_buffer("absmax_mean", torch.zeros((), dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None) -> NF4Linear:
        """Quantize ``linear`` (on its device); the compute dtype defaults to the weight's dtype."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    compute_dtype or weight.dtype, weight.device)
        for name, tensor in quantize_nf4(weight).items():
            getattr(layer, name).copy_(tensor)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    @property
    def device(self) -> torch.device:
        return self.packed_codes.device

    @property
    def weight(self) -> torch.Tensor:
        return torch.full((), float("nan"), dtype=self.compute_dtype, device=self.device).expand(
            self.out_features, self.in_features)

    def absmax(self) -> torch.Tensor:
        """First-level absmax c' per block of 64, float32 (the double quantization undone)."""
        return dequantize_absmax(self.absmax_codes, self.absmax_scale, self.absmax_mean)

    def dequantize(self) -> torch.Tensor:
        """dequant(W) = NF4[q] * c', shape [out, in], in ``compute_dtype``."""
        flat = dequantize_nf4_double(self.packed_codes, self.absmax_codes, self.absmax_scale,
                                     self.absmax_mean, self.in_features * self.out_features,
                                     self.compute_dtype, ABSMAX_BLOCK_SIZE)
        return flat.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _NF4LinearFunction.apply(x, self)
        return out + self.bias if self.bias is not None else out

    def _apply(self, fn, recurse=True):
        # `.to(dtype)` / `.half()` must change the compute dtype but never round the float32 scales of the
        # codes: remember them, let nn.Module move everything, then put the scales back at full precision
        # (on the new device) and take the new compute dtype from what `fn` does to a probe tensor.
        scales = {"absmax_scale": self.absmax_scale, "absmax_mean": self.absmax_mean}
        probe = torch.empty(0, dtype=self.compute_dtype, device=self.device)
        super()._apply(fn, recurse)
        self.compute_dtype = fn(probe).dtype
        for name, tensor in scales.items():
            setattr(self, name, tensor.to(self.packed_codes.device))
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}, block={BLOCK_SIZE}")
