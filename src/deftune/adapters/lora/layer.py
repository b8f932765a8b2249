"""The LoRA layer: a frozen linear map plus a trainable low-rank update.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685):

    h = W0 x + s * B A x,   A in R^{r x d_in}, B in R^{d_out x r},   s = alpha / r

or s = alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023, arXiv:2312.03732). B starts at zero, so the
adapted model equals the base model at step 0. deftune owns this module (instead of using PEFT's) so later
work can resize r per module, mask gradients and swap fused kernels; PEFT's file format is kept.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deftune.kernels.lora_linear import lora_linear


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class LoRALinear(nn.Module):
    """``base_layer`` (frozen nn.Linear) + ``lora_B(lora_A(dropout(x))) * scaling``.

    Attribute names match PEFT's (``base_layer``, ``lora_A``, ``lora_B``) so saved keys line up.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self.base_layer = base
        self.rank = rank
        self.alpha = alpha
        self.rslora = rslora
        self.scaling = lora_scaling(alpha, rank, rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = dict(device=base.weight.device, dtype=torch.float32)
        # Adapter weights stay in float32 (master weights) even over a bf16 base: small updates to
        # B A would otherwise round away.
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        self.reset_parameters()
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        # Some model code reads `.weight` of its projections (dtype/device checks).
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def reset_parameters(self) -> None:
        # Same init as the paper / PEFT: A ~ Kaiming-uniform, B = 0, so the update starts at zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """s * B A, the update to W0, in float32."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    # Set by the fast path (deftune.fast_path.patch, model.fast) on modules without dropout: base + update
    # run as one autograd.Function that saves only x and x A^T (deftune.kernels.lora_linear).
    fused: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and not self.merged:
            return lora_linear(x, self.base_layer, self.lora_A.weight, self.lora_B.weight, self.scaling)
        out = self.base_layer(x)
        if self.merged:
            return out
        lora_in = self.dropout(x).to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(lora_in)) * self.scaling
        return out + update.to(out.dtype)

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear with W0 + s B A (in the base dtype) and the base bias.

        A quantized base (NF4Linear, QLoRA) merges into its dequantized weight: dequant(W) + s B A.
        """
        base = self.base_layer
        w0 = base.dequantize() if hasattr(base, "dequantize") else base.weight
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=w0.device, dtype=w0.dtype)
        merged.weight.copy_((w0.float() + self.delta_weight()).to(w0.dtype))
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        return merged

    @torch.no_grad()
    def resize(self, rank: int, keep_update: bool = True) -> None:
        """Change r in place, keeping the scaling s and the best rank-``rank`` part of the update.

        With ``keep_update`` the new factors hold the truncated SVD of B A (``best_rank_factors``), so
        s B'A' is the best rank-k approximation of s B A (Eckart-Young) and equal to it when k = r; extra
        components when growing start like a fresh adapter (B columns zero, A rows Kaiming-uniform).
        Without it the factors are freshly shaped (the caller loads tensors into them next).
        alpha becomes s * k (s * sqrt(k) with rsLoRA) so alpha/r (PEFT's alpha_pattern) reproduces s.
        New ``nn.Linear`` objects replace lora_A/lora_B: optimizer state of the old tensors must go.
        """
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank} (drop the adapter to remove a module)")
        if rank == self.rank:
            return
        a_old, b_old = self.lora_A.weight, self.lora_B.weight
        factory = dict(device=a_old.device, dtype=a_old.dtype)
        lora_A = nn.Linear(self.in_features, rank, bias=False, **factory)
        lora_B = nn.Linear(rank, self.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_B.weight)
        if keep_update:
            b_new, a_new = best_rank_factors(b_old, a_old, rank)
            kept = b_new.shape[1]
            lora_B.weight[:, :kept] = b_new
            lora_A.weight[:kept] = a_new
        self.lora_A, self.lora_B = lora_A, lora_B
        self.rank = rank
        self.alpha = self.scaling * (math.sqrt(rank) if self.rslora else rank)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:.4g}, rslora={self.rslora}"


@torch.no_grad()
def best_rank_factors(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B', A') with B' A' the best rank-``rank`` approximation of B A in Frobenius norm.

    Computed in rank space, never forming the d_out x d_in product: B = Q_b R_b, A^T = Q_a R_a (reduced
    QR), SVD of the small core R_b R_a^T = U S V^T, then

        B' = Q_b U_k sqrt(S_k),   A' = sqrt(S_k) V_k^T Q_a^T,

    splitting the singular values evenly between the factors. For k >= rank(B A) the product is exact.
    Returns at most min(k, r, d_out, d_in) components (fewer columns than asked when B A is smaller).
    """
    q_b, r_b = torch.linalg.qr(b.float())
    q_a, r_a = torch.linalg.qr(a.float().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    b_new = (q_b @ u[:, :k]) * root
    a_new = root[:, None] * (vh[:k] @ q_a.T)
    return b_new.to(b.dtype), a_new.to(a.dtype)
