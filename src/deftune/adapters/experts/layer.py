"""Routed experts with a trainable subset: ESFT (full update of chosen experts) and expert-LoRA.

ESFT (Wang et al. 2024, "Let the Expert Stick to His Last: Expert-Specialized Fine-Tuning for Sparse
Architectural Large Language Models", EMNLP 2024, arXiv:2407.01906) tunes only the experts a task routes
to. For an MoE layer with experts E_e and router weights g_{e,t} (top-K, zero elsewhere)

    y_t = sum_{e in TopK(t)} g_{e,t} * down_e( act(gate_e x_t) * up_e x_t )

deftune replaces the layer's experts module (one fused tensor per projection, [E, 2I, H] and [E, H, I])
by ``ExpertSubset``, which keeps those tensors frozen and adds, for the chosen experts S only (|S| = k):

* ``esft``: trainable copies W'_e of gate_up_e and down_e for e in S, used in place of W_e;
* ``lora``: per-expert LoRA (Hu et al. 2021, arXiv:2106.09685), W_e x + s * B_e A_e x for e in S,
  with A_e in R^{r x d_in}, B_e in R^{d_out x r}, s = alpha / r (alpha / sqrt(r) with rsLoRA).

Nothing trainable spans all E experts (PEFT's ``target_parameters`` creates a delta for every expert), so
trainable parameters, gradients and optimizer state grow with k, not E. Token-expert pairs are sorted so
that pairs routed to unselected experts come first and those routed to S last: the frozen part runs as
one grouped GEMM over E experts and the trainable (or LoRA) part only on the rows routed to S.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deftune.adapters.lora.layer import lora_scaling
from deftune.errors import DeftuneError


def _grouped_mm_available(x: torch.Tensor, w: torch.Tensor) -> bool:
    # torch's grouped GEMM is the fast path on CUDA for 16-bit weights; on CPU (and for fp32) its kernels
    # are young (alignment rules, broken backward in some builds), so the loop below is used instead.
    return (
        x.is_cuda
        and w.dtype in (torch.bfloat16, torch.float16)
        and (hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm"))
    )


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, bounds: list[int] | None = None
) -> torch.Tensor:
    """Rows ``offsets[g-1]:offsets[g]`` of ``x`` times ``weight[g]^T`` for every group g.

    x [M, d_in], weight [G, d_out, d_in], offsets [G] cumulative row ends (int32), M == offsets[-1].
    ``bounds`` is ``offsets.tolist()`` when the caller already has it (the loop path needs host ints).
    """
    if x.shape[0] == 0:
        out = x.new_zeros(0, weight.shape[1])
        # Keep a trainable weight in the graph so its .grad exists (zeros) when no row reached it.
        return out + weight.sum().to(out.dtype) * 0 if weight.requires_grad else out
    if _grouped_mm_available(x, weight):
        wt = weight.transpose(-2, -1)
        fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
        return fn(x.to(weight.dtype), wt, offs=offsets)
    ends = bounds if bounds is not None else offsets.tolist()
    outs, start = [], 0
    for g, end in enumerate(ends):
        if end > start:
            outs.append(x[start:end] @ weight[g].transpose(0, 1).to(x.dtype))
        start = end
    return torch.cat(outs, 0)


class ExpertSubset(nn.Module):
    """A fused-experts module whose experts ``selected`` are trainable (mode esft) or carry LoRA (mode lora).

    Keeps the frozen ``gate_up_proj`` / ``down_proj`` under their original names (state_dict keys of the
    base model are unchanged) and the same forward signature as transformers' experts modules.
    """

    def __init__(
        self,
        experts: nn.Module,
        selected: list[int],
        mode: str,
        rank: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        rslora: bool = False,
    ):
        super().__init__()
        if mode not in ("esft", "lora"):
            raise DeftuneError(f"expert mode must be esft or lora, got {mode!r}")
        for attr in ("gate_up_proj_bias", "down_proj_bias"):
            if getattr(experts, attr, None) is not None:
                raise DeftuneError(f"{type(experts).__name__} has expert biases ({attr}); not supported yet")
        if getattr(experts, "is_transposed", False) or not getattr(experts, "has_gate", True):
            raise DeftuneError(
                f"{type(experts).__name__}: only gated experts stored as [E, 2I, H] are supported"
            )
        self.gate_up_proj = experts.gate_up_proj
        self.down_proj = experts.down_proj
        self.gate_up_proj.requires_grad_(False)
        self.down_proj.requires_grad_(False)
        self.act_fn = experts.act_fn
        # The original module, kept outside the module tree so unwrap() can put it back as it was.
        self.__dict__["_original"] = experts
        self.num_experts = int(self.gate_up_proj.shape[0])
        ids = sorted({int(e) for e in selected})
        if not ids:
            raise DeftuneError("an ExpertSubset needs at least one selected expert")
        bad = [e for e in ids if not 0 <= e < self.num_experts]
        if bad:
            raise DeftuneError(f"expert ids {bad} out of range: this layer has {self.num_experts} experts")
        self.mode = mode
        self.selected_ids = ids
        device = self.gate_up_proj.device
        slot = torch.full((self.num_experts,), -1, dtype=torch.long, device=device)
        slot[torch.tensor(ids, device=device)] = torch.arange(len(ids), device=device)
        self.register_buffer("slot", slot, persistent=False)
        self.register_buffer("selected", torch.tensor(ids, dtype=torch.long, device=device), persistent=False)
        index = self.selected
        if mode == "esft":
            # float32 master copies: bf16 cannot absorb small AdamW updates.
            self.gate_up_train = nn.Parameter(self.gate_up_proj.detach()[index].float())
            self.down_train = nn.Parameter(self.down_proj.detach()[index].float())
        else:
            k = len(ids)
            two_i, h = self.gate_up_proj.shape[1:]
            i = self.down_proj.shape[2]
            self.rank, self.alpha, self.rslora = rank, alpha, rslora
            self.scaling = lora_scaling(alpha, rank, rslora)
            f32 = dict(device=device, dtype=torch.float32)
            self.lora_gate_up_A = nn.Parameter(torch.empty(k, rank, h, **f32))
            self.lora_gate_up_B = nn.Parameter(torch.zeros(k, two_i, rank, **f32))
            self.lora_down_A = nn.Parameter(torch.empty(k, rank, i, **f32))
            self.lora_down_B = nn.Parameter(torch.zeros(k, h, rank, **f32))
            for a in (self.lora_gate_up_A, self.lora_down_A):
                for e in range(k):
                    # Same init as LoRALinear: A Kaiming-uniform, B zero, so the update starts at zero.
                    nn.init.kaiming_uniform_(a.data[e], a=math.sqrt(5))
            self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"mode={self.mode}, experts={self.selected_ids} of {self.num_experts}"

    def trainable_numel(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _project(
        self,
        x: torch.Tensor,
        frozen_w: torch.Tensor,
        offs_f,
        offs_s,
        bounds_f,
        bounds_s,
        n_frozen: int,
        which: str,
    ) -> torch.Tensor:
        """One projection (gate_up or down) over rows sorted [unselected | selected]."""
        x_f, x_s = x[:n_frozen], x[n_frozen:]
        out_f = grouped_linear(x_f, frozen_w, offs_f, bounds_f)
        if self.mode == "esft":
            train_w = self.gate_up_train if which == "gate_up" else self.down_train
            out_s = grouped_linear(x_s, train_w.to(x.dtype), offs_s, bounds_s)
        else:
            # Frozen part of the selected rows: offsets over all E with only the selected groups non-empty,
            # so no copy of the selected experts' weights is made.
            out_s = grouped_linear(x_s, frozen_w, self._full_offsets(offs_s), None)
            a = self.lora_gate_up_A if which == "gate_up" else self.lora_down_A
            b = self.lora_gate_up_B if which == "gate_up" else self.lora_down_B
            lora_in = self.dropout(x_s)
            mid = grouped_linear(lora_in, a.to(x.dtype), offs_s, bounds_s)
            out_s = out_s + grouped_linear(mid, b.to(x.dtype), offs_s, bounds_s) * self.scaling
        return torch.cat([out_f, out_s.to(out_f.dtype)], 0)

    def _full_offsets(self, offs_s: torch.Tensor) -> torch.Tensor:
        counts_s = torch.diff(offs_s, prepend=offs_s.new_zeros(1))
        counts = offs_s.new_zeros(self.num_experts)
        counts[self.selected] = counts_s
        return torch.cumsum(counts, 0, dtype=torch.int32)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        num_k = top_k_index.shape[-1]
        flat_e = top_k_index.reshape(-1)
        flat_w = top_k_weights.reshape(-1)
        slot = self.slot[flat_e]
        # Sort key: unselected experts by id first, then the selected ones by slot.
        key = torch.where(slot >= 0, self.num_experts + slot, flat_e)
        key_sorted, order = torch.sort(key, stable=True)
        token = order // num_k
        x = hidden_states[token]
        counts = torch.bincount(key_sorted, minlength=self.num_experts + len(self.selected_ids))
        offs_f = torch.cumsum(counts[: self.num_experts], 0, dtype=torch.int32)
        offs_s = torch.cumsum(counts[self.num_experts :], 0, dtype=torch.int32)
        # One host sync per layer: slicing rows needs the split point (the loop path needs all bounds).
        if _grouped_mm_available(x, self.gate_up_proj):
            n_frozen = int(offs_f[-1])
            bounds_f = bounds_s = None
        else:
            bounds = torch.cat([offs_f, offs_s]).tolist()
            bounds_f, bounds_s = bounds[: self.num_experts], bounds[self.num_experts :]
            n_frozen = bounds_f[-1]
        offs_s_rows = offs_s  # relative to the selected block
        gate_up = self._project(
            x, self.gate_up_proj, offs_f, offs_s_rows, bounds_f, bounds_s, n_frozen, "gate_up"
        )
        gate, up = gate_up.chunk(2, dim=-1)
        inner = self.act_fn(gate) * up
        out = self._project(inner, self.down_proj, offs_f, offs_s_rows, bounds_f, bounds_s, n_frozen, "down")
        out = (out * flat_w[order].unsqueeze(-1)).to(hidden_states.dtype)
        return torch.zeros_like(hidden_states).index_add_(0, token, out)

    @torch.no_grad()
    def merged_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The selected experts' effective (gate_up [k, 2I, H], down [k, H, I]) in the base dtype."""
        dtype = self.gate_up_proj.dtype
        if self.mode == "esft":
            return self.gate_up_train.to(dtype), self.down_train.to(dtype)
        gu = (
            self.gate_up_proj[self.selected].float()
            + torch.bmm(self.lora_gate_up_B, self.lora_gate_up_A) * self.scaling
        )
        dn = (
            self.down_proj[self.selected].float()
            + torch.bmm(self.lora_down_B, self.lora_down_A) * self.scaling
        )
        return gu.to(dtype), dn.to(dtype)

    @torch.no_grad()
    def unwrap(self, merge: bool) -> nn.Module:
        """The original experts module, with the selected experts' effective weights written in when
        ``merge`` (else unchanged)."""
        original = self.__dict__["_original"]
        if merge:
            gu, dn = self.merged_weights()
            original.gate_up_proj.data[self.selected] = gu
            original.down_proj.data[self.selected] = dn
        return original
