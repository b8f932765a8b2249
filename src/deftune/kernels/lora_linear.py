"""LoRA linear layer whose backward works in rank space (small autograd Functions).

LoRA (Hu et al. 2021, arXiv:2106.09685) with a frozen base W0 [out, in], A [r, in], B [out, r]:

    y = x W0^T + b + s * (x A^T) B^T

Autograd of the plain module keeps x, x A^T *and* a float32 copy of x for the adapter branch (plus any
dropout output). This Function saves only x and the small u = x A^T [.., r], and derives every gradient
from them, never forming an [out, in] matrix:

    dU = s * dy B                [.., r]
    dB = s * dy^T u              [out, r]
    dA = dU^T x                  [r, in]
    dx = dy W0 + dU A            [.., in]

Everything is computed in W0's dtype (bf16 on a GPU), and dA, dB are returned in A's and B's dtype
(float32 master weights). A base that stores its weight quantized exposes ``dequantize()`` (4-bit NF4):
W0 is dequantized in forward and again in backward, so the full-precision copy is never kept alive
between the two (``train.reuse_dequantized`` keeps it from a recompute to the backward right after it).
The adapter term and the base GEMM are separate Functions (the GEMM saves nothing and runs last), so a
checkpointed layer's recompute stops before its final GEMM, and a recompute may be handed the GEMM's output
instead of running it (:func:`lora_linear_given`). Projections that read the same x share one adapter
Function (:func:`lora_group`), and a LoRA down projection takes SwiGLU into its own
(:func:`swiglu_lora_linear`). The base GEMM adds its product onto the adapter term's buffer in place
(beta = 1 epilogue, no copy), and the compute-dtype copies of A and s B are made once per step (cached
until the factors change; see ``_CASTS``).
Only valid without LoRA dropout (dropout would need its mask saved); the patch leaves such modules alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakTensorKeyDictionary

from deftune.kernels.swiglu import swiglu_backward_with_values_, swiglu_values

__all__ = ["base_weight", "compute_dtype", "keep_dequantized_on_recompute", "lora_group", "lora_linear",
           "lora_linear_given", "recompute_scope", "recomputing", "run_dtype", "swiglu_lora_linear"]


# 4-bit bases of offloaded layers under ``train.reuse_dequantized``: the weight dequantized for a layer's
# recompute, kept until that layer's backward (which follows at once) instead of dequantized again there.
# Of the three dequantizations per projection and step (forward, recompute, backward) one goes; the price
# is one layer's recomputed projections in the compute dtype, held through that layer's backward only.
_KEPT_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# A 4-bit base registered with :func:`keep_dequantized_on_recompute` keeps the weight its recompute
# dequantized (``_KEPT_WEIGHTS``) for the backward that follows at once.
_KEEP_ON_RECOMPUTE: weakref.WeakSet = weakref.WeakSet()
# True while a checkpointed layer is being recomputed in backward (set by the fast path's offloaded
# checkpointing), so the recompute can skip work the backward does itself.
_RECOMPUTING: contextvars.ContextVar[bool] = contextvars.ContextVar("deftune_recomputing", default=False)


def recomputing() -> bool:
    """True while an offloaded layer is being recomputed in backward (not in its first forward)."""
    return _RECOMPUTING.get()


@contextlib.contextmanager
def recompute_scope(active: bool):
    """Mark the code inside as a backward-time recompute (``active``) or a first forward."""
    token = _RECOMPUTING.set(active)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


def keep_dequantized_on_recompute(base: nn.Module) -> None:
    """Keep ``base``'s weight dequantized by a recompute until the backward right after it
    (``train.reuse_dequantized``): one dequantization of three per step saved, one layer's worth held."""
    _KEEP_ON_RECOMPUTE.add(base)


def base_weight(base: nn.Module) -> torch.Tensor:
    """W0 [out, in] of a frozen base layer: ``dequantize()`` when it stores a quantized weight."""
    if hasattr(base, "dequantize"):
        weight = base.dequantize()
        if recomputing() and base in _KEEP_ON_RECOMPUTE:
            _KEPT_WEIGHTS[base] = weight
        return weight
    return base.weight


def backward_weight(base: nn.Module) -> torch.Tensor:
    """W0 for a backward: the copy its recompute kept (handed over once), else :func:`base_weight`."""
    kept = _KEPT_WEIGHTS.pop(base, None)
    return kept if kept is not None else base_weight(base)


def _drop_kept(*bases: nn.Module) -> None:
    """A backward that did not need W0 (no dx wanted) still releases what its recompute kept."""
    for base in bases:
        _KEPT_WEIGHTS.pop(base, None)


def compute_dtype(base: nn.Module) -> torch.dtype:
    """The dtype W0 is used in: its ``weight``'s (a 4-bit layer exposes one in its compute dtype), else the
    declared ``compute_dtype``, else the dequantized weight's."""
    declared = getattr(base, "compute_dtype", None)
    if isinstance(declared, torch.dtype) and hasattr(base, "dequantize"):
        return declared  # a 4-bit layer's weight property would build a tensor on every call
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    return declared if declared is not None else base_weight(base).dtype


def run_dtype(x: torch.Tensor, base: nn.Module) -> torch.dtype:
    """The dtype a projection of ``x`` computes in: autocast's when autocast is on for x's device (what
    ``F.linear`` would use there, whatever W0 is stored in), else W0's (:func:`compute_dtype`)."""
    device_type = x.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        enabled = torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()
    if enabled:
        return torch.get_autocast_dtype(device_type)
    return compute_dtype(base)


# Compute-dtype copies of the float32 LoRA factors (A, and B with the scaling folded in), made once per
# step instead of in every forward, recompute and backward: at 1B scale a step is bound by host-side op
# launches, and these casts were ~1,000 of its ~4,500 kernels. An entry is valid while the parameter's
# version counter (in-place updates: copy_, load_state_dict, foreach optimizers), its storage address
# (``param.data = ...``) and the count of optimizer steps taken in this process all stay the same -- the
# last because the fused AdamW kernel updates parameters in place *without* bumping their version counter.
# A backward drops the entries it used, so the copies of layers already back-propagated are not held
# while the gradients of the others build up. (An update through ``param.data.copy_`` outside an optimizer
# is invisible to all three; nothing in deftune does that to a LoRA factor.)
_CASTS = WeakTensorKeyDictionary()
_CAT_CASTS = WeakTensorKeyDictionary()
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(_optimizer, _args, _kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _cast(param: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """``(param * scale).to(dtype)`` without autograd, cached until ``param`` changes."""
    if param.dtype == dtype and scale == 1.0:
        return param.detach()  # nothing to cast (and a cache entry would keep its own key alive)
    if param.is_inference():  # no version counter to key on: cast every time
        with torch.no_grad():
            return (param * scale if scale != 1.0 else param).to(dtype)
    key = (param._version, param.data_ptr(), _OPTIMIZER_STEPS[0], dtype, scale)
    hit = _CASTS.get(param)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        value = (param * scale if scale != 1.0 else param).to(dtype)
    _CASTS[param] = (key, value)
    return value


def _scaled(product: torch.Tensor, scale: float) -> torch.Tensor:
    """``product * scale``, without the multiply kernel when the scale is 1 (alpha = r, the common LoRA
    setting): a launch saved per factor gradient and step on a host-bound step, the same values."""
    return product if scale == 1.0 else product * scale


def _cast_cat(params, dtype: torch.dtype) -> torch.Tensor:
    """``torch.cat([p.to(dtype) for p in params])`` (rank axis), cached like :func:`_cast`."""
    if len(params) == 1:
        return _cast(params[0], dtype)
    if any(p.is_inference() for p in params):
        with torch.no_grad():
            return torch.cat([p.to(dtype) for p in params], 0)
    key = (tuple((id(p), p._version, p.data_ptr()) for p in params), _OPTIMIZER_STEPS[0], dtype)
    hit = _CAT_CASTS.get(params[0])
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        value = torch.cat([p.to(dtype) for p in params], 0)
    _CAT_CASTS[params[0]] = (key, value)
    return value


def _forget(*params: torch.Tensor) -> None:
    """Drop the cached casts of ``params`` (their last use in this step was the backward just run)."""
    for p in params:
        _CASTS.pop(p, None)
        _CAT_CASTS.pop(p, None)


class FrozenAddmmFunction(torch.autograd.Function):
    """``low + x W0^T`` for a frozen W0, saving nothing: its gradient reaches x through ``low``'s
    function (:class:`LoRAGroupDeltaFunction` computes dx = dU A + sum_i dy_i W0_i in one buffer)."""

    @staticmethod
    def forward(ctx, low, x2, w0):
        # In place: the GEMM's epilogue adds x W0^T onto low (beta = 1). torch.addmm(low, ...) would first
        # copy low into a new output -- a device-to-device copy of every projection's [tokens, out] output,
        # 13 per layer and step (serialised behind the offload's PCIe
        # copies on the copy engine). low is the adapter Function's own fresh output, read by nothing else.
        ctx.mark_dirty(low)
        return low.addmm_(x2, w0.t())

    @staticmethod
    def backward(ctx, dy2):
        return dy2, None, None


class GivenOutputFunction(torch.autograd.Function):
    """Stands in for :class:`FrozenAddmmFunction` when its output is already known (a copy kept from the
    first forward, see :mod:`deftune.fast_path.offload`): returns ``value`` with the same backward."""

    @staticmethod
    def forward(ctx, low, value):
        return value

    @staticmethod
    def backward(ctx, dy2):
        return dy2, None


def lora_linear(x: torch.Tensor, base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float) -> torch.Tensor:
    """``x W0^T + b + s (x A^T) B^T`` with the rank-space backward above; ``base`` is frozen (its
    weight and bias get no gradient)."""
    return lora_linear_given(x, base, lora_a, lora_b, scaling, None)


def lora_linear_given(x: torch.Tensor, base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      scaling: float, value: torch.Tensor | None) -> torch.Tensor:
    """:func:`lora_linear`; when ``value`` (the output, [..., out]) is given the base GEMM is skipped and
    ``value`` returned, with the same graph and saved tensors as a full call (for recomputation)."""
    dtype = run_dtype(x, base) if value is None else value.dtype
    (low,) = LoRAGroupDeltaFunction.apply(x, dtype, (base,), (scaling,), lora_a, lora_b)
    x2 = x.detach().to(dtype).reshape(-1, x.shape[-1])
    if value is None:
        # W0 read (dequantized, for a 4-bit base) after the last save: a recompute stops before this.
        y = FrozenAddmmFunction.apply(low, x2, base_weight(base).to(dtype))
    else:
        y = GivenOutputFunction.apply(low, value.reshape(low.shape[0], -1))
    return y.reshape(*x.shape[:-1], y.shape[-1])


class LoRAGroupDeltaFunction(torch.autograd.Function):
    """The adapter terms of n projections that read the same x (q/k/v, or gate/up), in one Function.

    With A = [A_1; ..; A_n] stacked along the rank axis, u = x A^T is one GEMM (x read once instead of n
    times) and low_i = s_i u_i B_i^T (+ b_i). Backward, with dU_i = s_i dy_i B_i:

        dA = dU^T x   (one GEMM, x read once),   dB_i = s_i dy_i^T u_i,
        dx = dU A + sum_i dy_i W0_i   (one buffer: the base GEMMs accumulate into it in place)

    instead of n separate dx tensors summed by autograd (n = 1: a single projection). Saves x and u only.

    Split from the base GEMMs (:class:`FrozenAddmmFunction`, which saves nothing) so that under
    non-reentrant checkpointing the last tensors a layer saves are saved *before* its last big GEMM: torch
    stops a recompute as soon as every saved tensor is back (``early_stop``), so a GEMM whose output
    backward never reads (the MLP's down projection) is not recomputed at all. The factors ride on ctx, not
    through save_for_backward: a checkpoint's saved-tensor hooks would hand backward detached aliases of
    them, which miss the cast cache (and pass through the offload hooks).
    """

    @staticmethod
    def forward(ctx, x, dtype, bases, scalings, *factors):
        n = len(bases)
        lora_as, lora_bs = factors[:n], factors[n:]
        xc = x.to(dtype)
        x2 = xc.reshape(-1, xc.shape[-1])
        u = x2 @ _cast_cat(lora_as, dtype).t()
        lows, start = [], 0
        for base, s, a, b in zip(bases, scalings, lora_as, lora_bs):
            low = u[:, start:start + a.shape[0]] @ _cast(b, dtype, s).t()
            if base.bias is not None:
                low = low + base.bias.to(dtype)
            lows.append(low)
            start += a.shape[0]
        ctx.bases, ctx.scalings, ctx.x_dtype = bases, scalings, x.dtype
        ctx.factors = factors  # on ctx, not saved (see the class docstring)
        ctx.save_for_backward(xc, u)
        return tuple(lows)

    @staticmethod
    def backward(ctx, *dys):
        xc, u = ctx.saved_tensors
        factors = ctx.factors
        n = len(ctx.bases)
        lora_as, lora_bs = factors[:n], factors[n:]
        dtype = xc.dtype
        x2 = xc.reshape(-1, xc.shape[-1])
        wants_a, wants_b = ctx.needs_input_grad[4:4 + n], ctx.needs_input_grad[4 + n:]
        dus, dbs, start = [], [], 0
        for i, (s, a, b) in enumerate(zip(ctx.scalings, lora_as, lora_bs)):
            width = a.shape[0]
            if dys[i] is None:  # an output that reached no loss
                dus.append(u.new_zeros(u.shape[0], width))
                dbs.append(torch.zeros_like(b) if wants_b[i] else None)
            else:
                dy = dys[i].to(dtype)
                dus.append(dy @ _cast(b, dtype, s))
                dbs.append(_scaled(dy.t() @ u[:, start:start + width], s).to(b.dtype) if wants_b[i] else None)
            start += width
        du = dus[0] if n == 1 else torch.cat(dus, 1)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = du @ _cast_cat(lora_as, dtype)
            for dy, base in zip(dys, ctx.bases):
                if dy is not None:
                    dx.addmm_(dy.to(dtype), backward_weight(base).to(dtype))
            dx = dx.reshape(xc.shape).to(ctx.x_dtype)
        das = [None] * n
        if any(wants_a):
            # One cast of the stacked dA (the factors share a dtype): one launch instead of one per projection.
            da_all = du.t() @ x2
            if len({a.dtype for a in lora_as}) == 1:
                da_all = da_all.to(lora_as[0].dtype)
            das = [d.to(a.dtype) if want else None
                   for d, a, want in zip(da_all.split([a.shape[0] for a in lora_as], 0), lora_as, wants_a)]
        _forget(*factors)
        _drop_kept(*ctx.bases)
        return (dx, None, None, None, *das, *dbs)


def lora_group(x: torch.Tensor, projections: list[nn.Module], values: list | None = None) -> list[torch.Tensor]:
    """The outputs of fused LoRA ``projections`` (LoRALinear modules) that all read ``x``, through
    :class:`LoRAGroupDeltaFunction` and one saving-nothing base GEMM each (or the given ``values``, as in
    :func:`lora_linear_given`)."""
    bases = tuple(p.base_layer for p in projections)
    dtype = run_dtype(x, bases[0]) if values is None else values[0].dtype
    factors = [p.lora_A.weight for p in projections] + [p.lora_B.weight for p in projections]
    lows = LoRAGroupDeltaFunction.apply(x, dtype, bases, tuple(p.scaling for p in projections), *factors)
    x2 = x.detach().to(dtype).reshape(-1, x.shape[-1])
    outs = []
    for i, (low, base) in enumerate(zip(lows, bases)):
        if values is None:
            y = FrozenAddmmFunction.apply(low, x2, base_weight(base).to(dtype))
        else:
            y = GivenOutputFunction.apply(low, values[i].reshape(low.shape[0], -1))
        outs.append(y.reshape(*x.shape[:-1], y.shape[-1]))
    return outs


# One row block of the MLP backward's [rows, I] temporaries (64 MiB: 2.3k rows of Llama-3-8B's 14336 in
# bf16; big enough that the block GEMMs run at full speed).
_BACKWARD_BLOCK_BYTES = 64 * 2**20


class SwiGLULoRADeltaFunction(torch.autograd.Function):
    """SwiGLU followed by the adapter term of the down projection: with h = silu(g) * u (Shazeer 2020,
    arXiv:2002.05202) returns ``(s (h A^T) B^T, h)``, h without gradient (it only feeds the base GEMM,
    whose dx this backward computes). Saves g, u and the rank-r product h A^T, *not* h. Backward, per
    block of rows: h rebuilt for dA = dU^T h, dh = dy W0 + dU A, then dg and du written over g and u; so
    the MLP's backward holds g, u and one block, where autograd of the plain layers holds g, u, h, dh,
    dg and du at full length."""

    @staticmethod
    def forward(ctx, gate, up, lora_a, lora_b, base, scaling, dtype):
        h = swiglu_values(gate, up).to(dtype)
        h2 = h.reshape(-1, h.shape[-1])
        hu = h2 @ _cast(lora_a, dtype).t()
        low = hu @ _cast(lora_b, dtype, scaling).t()
        if base.bias is not None:
            low = low + base.bias.to(dtype)
        ctx.base, ctx.scaling = base, scaling
        ctx.mark_non_differentiable(h2)
        # h2 never gets a gradient: without this autograd would hand backward a [T, I] tensor of zeros.
        ctx.set_materialize_grads(False)
        ctx.factors = (lora_a, lora_b)  # on ctx, not saved: see LoRAGroupDeltaFunction
        ctx.save_for_backward(gate, up, hu)
        return low, h2

    @staticmethod
    def backward(ctx, dy2, _dh2_unused):
        if dy2 is None:  # grads are not materialized: nothing reached the adapter's output
            _drop_kept(ctx.base)
            return None, None, None, None, None, None, None
        gate, up, hu = ctx.saved_tensors
        lora_a, lora_b = ctx.factors
        s = ctx.scaling
        dtype = hu.dtype
        dy2 = dy2.to(dtype)
        du = dy2 @ _cast(lora_b, dtype, s)
        db = _scaled(dy2.t() @ hu, s).to(lora_b.dtype) if ctx.needs_input_grad[3] else None
        width = gate.shape[-1]
        g2, u2 = gate.contiguous().reshape(-1, width), up.contiguous().reshape(-1, width)
        w0, a = backward_weight(ctx.base).to(dtype), _cast(lora_a, dtype)
        da = None
        # Row blocks: dh = dU A + dy W0 exists one block at a time; one kernel then writes the block's dg,
        # du over g and u and h = silu(g) u over dh (h is what dA = dU^T h needs), so the MLP's backward
        # holds g, u and one [rows, I] block and rebuilds h without a kernel or a buffer of its own.
        rows = max(1, _BACKWARD_BLOCK_BYTES // (width * g2.element_size()))
        for start in range(0, g2.shape[0], rows):
            end = min(start + rows, g2.shape[0])
            du_blk = du[start:end]
            dh = (du_blk @ a).addmm_(dy2[start:end], w0)
            h = swiglu_backward_with_values_(dh, g2[start:end], u2[start:end])
            if ctx.needs_input_grad[2]:
                part = du_blk.t() @ h.to(dtype)
                da = part.float() if da is None else da.add_(part)
            del dh, h
        if da is not None:
            da = da.to(lora_a.dtype)
        _forget(lora_a, lora_b)
        return g2.reshape(gate.shape), u2.reshape(up.shape), da, db, None, None, None


def swiglu_lora_linear(gate: torch.Tensor, up: torch.Tensor, base: nn.Module, lora_a: torch.Tensor,
                       lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``down(silu(gate) * up)`` for a LoRA down projection (frozen ``base``), as
    :class:`SwiGLULoRADeltaFunction` + the saving-nothing base GEMM. ``gate`` and ``up`` are overwritten
    by their gradients in backward (the MLP's own outputs, read by nothing else)."""
    dtype = run_dtype(gate, base)
    low, h2 = SwiGLULoRADeltaFunction.apply(gate, up, lora_a, lora_b, base, scaling, dtype)
    y = FrozenAddmmFunction.apply(low, h2, base_weight(base).to(dtype))
    return y.reshape(*gate.shape[:-1], y.shape[-1])
