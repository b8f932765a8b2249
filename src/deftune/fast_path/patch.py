"""Swap deftune's kernels into a Hugging Face Llama, Qwen2, Qwen3 or Mistral model (``model.fast``).

Each patched module keeps its parameters and state-dict keys; only its ``forward`` changes, so adapters
still save in PEFT's format and the model still loads anywhere. What is swapped:

- every RMSNorm -> :func:`~deftune.kernels.rmsnorm.rms_norm`;
- rotary embedding in each attention module -> :func:`~deftune.kernels.rope.rope_qk` (a forward that
  mirrors transformers' ``LlamaAttention.forward``; with a KV cache, i.e. generation, it hands over to
  the model's own forward, so cache handling stays transformers');
- every MLP ``down(silu(gate(x)) * up(x))`` -> ``down(swiglu(gate(x), up(x)))``;
- every LoRA projection without dropout -> :func:`~deftune.kernels.lora_linear.lora_linear`;
- the LM head + loss -> :func:`~deftune.kernels.linear_ce.linear_cross_entropy` (:func:`fast_loss_sum`,
  called by ``deftune.training.loss`` for a patched model).

Which models are patched, and how many modules each kernel took over, is kept here (:func:`fast_counts`),
not on the model object.

Gemma (GeGLU MLP, ``(1 + w)`` RMSNorm, logit soft-capping) and other families are not patched.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from typing import Callable

import torch
from torch import nn

from deftune.adapters.lora.layer import LoRALinear
from deftune.fast_path.stash import current_mlp_stash
from deftune.kernels.linear_ce import linear_cross_entropy
from deftune.kernels.lora_linear import (
    compute_dtype,
    lora_group,
    lora_linear_given,
    swiglu_lora_linear,
)
from deftune.kernels.rmsnorm import rms_norm
from deftune.kernels.rope import rope_qk
from deftune.kernels.swiglu import swiglu
from deftune.kernels.varlen import is_segment_mask, varlen_causal_attention
from deftune.models.surgery import pieces

__all__ = ["SUPPORTED", "apply_fast_path", "fast_counts", "fast_loss_sum", "is_fast", "stash_ready"]

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")
_SILU = ("silu", "swish")


# A patched model carries what was patched under this name, read and written only here (through
# is_fast / fast_counts); kept on the model so that a copy of it (copy.deepcopy) is patched too.
_COUNTS_ATTR = "_deftune_fast_path_counts"


def is_fast(model: nn.Module) -> bool:
    """Whether :func:`apply_fast_path` patched ``model``."""
    return _COUNTS_ATTR in vars(model)


def fast_counts(model: nn.Module) -> dict[str, int]:
    """What :func:`apply_fast_path` returned for ``model`` (empty when it is not patched)."""
    return dict(vars(model).get(_COUNTS_ATTR, {}))


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    stash = current_mlp_stash()
    if stash is None or stash.recording:
        gate, up = _project(self, x, ("gate_proj", "up_proj"))
        if stash is not None:  # first forward of a layer that keeps its gate/up outputs (host or GPU memory)
            stash.keep(gate)
            stash.keep(up)
    else:  # its recompute: the same graph and saved tensors, the two GEMMs' outputs handed back
        gate, up = _project(self, x, ("gate_proj", "up_proj"), values=[stash.take(), stash.take()])
    # gate and up feed nothing but the product, so its backward may overwrite them with their gradients.
    down = self.down_proj
    if _fused(down):
        return swiglu_lora_linear(gate, up, down.base_layer, down.lora_A.weight, down.lora_B.weight, down.scaling)
    return down(swiglu(gate, up, inplace_backward=True))


def _fused(module: nn.Module) -> bool:
    return isinstance(module, LoRALinear) and module.fused and not module.merged


def _project(module: nn.Module, x: torch.Tensor, names: tuple[str, ...], values: list | None = None) -> list:
    """``[module.<name>(x) for name in names]``; fused LoRA projections of one compute dtype run as one
    :func:`~deftune.kernels.lora_linear.lora_group` (x read once by the rank GEMMs, one dx buffer).
    ``values``: the outputs, known already (MLP stash replay; only fused projections get there)."""
    projections = [getattr(module, name) for name in names]
    if all(_fused(p) for p in projections) and \
            len({compute_dtype(p.base_layer) for p in projections}) == 1:
        return lora_group(x, projections, values)
    if values is not None:
        return [lora_linear_given(x, p.base_layer, p.lora_A.weight, p.lora_B.weight, p.scaling, v)
                for p, v in zip(projections, values)]
    return [p(x) for p in projections]


def stash_ready(model: nn.Module) -> str:
    """Empty when every MLP can hand its gate/up outputs to :class:`deftune.fast_path.stash.MlpStash`
    (fast path on, gate_proj and up_proj fused LoRA projections), else what is missing."""
    if not fast_counts(model).get("swiglu"):
        return "model.fast on a Llama, Qwen2/3 or Mistral model (its patched MLPs keep the outputs)"
    for name, mlp in pieces(model).mlps:
        for proj in ("gate_proj", "up_proj"):
            module = getattr(mlp, proj, None)
            if not _fused(module):
                return (f"LoRA without dropout on gate_proj and up_proj of every MLP ({name}.{proj} is "
                        f"{type(module).__name__}{'' if not isinstance(module, LoRALinear) else ' with dropout'})")
    return ""


def _attention_interface(module: nn.Module) -> Callable:
    """The attention function transformers itself would call (eager, sdpa, flash...)."""
    modeling = sys.modules[type(module).__module__]
    impl = module.config._attn_implementation
    functions = modeling.ALL_ATTENTION_FUNCTIONS
    if hasattr(functions, "get_interface"):
        return functions.get_interface(impl, modeling.eager_attention_forward)
    return modeling.eager_attention_forward if impl in (None, "eager") else functions[impl]


def _sliding_window_kwargs(module: nn.Module) -> dict:
    # Llama passes no window; Qwen2/3 keep a per-layer one on the module; Mistral reads its config.
    model_type = module.config.model_type
    if model_type in ("qwen2", "qwen3"):
        return {"sliding_window": getattr(module, "sliding_window", None)}
    if model_type == "mistral":
        return {"sliding_window": getattr(module.config, "sliding_window", None)}
    return {}


@functools.lru_cache(maxsize=None)
def _named_parameters(cls: type) -> frozenset[str]:
    params = inspect.signature(cls.forward).parameters
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(n for n, p in params.items() if p.kind in kinds) - {"self", "hidden_states"}


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
    """transformers' Llama/Qwen2/Qwen3/Mistral attention forward with RoPE from ``rope_qk``.

    The KV cache is named ``cache`` in transformers >= 5.2x and ``past_key_values`` before; with one (or
    any call shape not seen in training) the model's own forward runs.
    """
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None or position_embeddings is None or args:
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    # Arguments the model's forward names itself (the cache, and cache_position in older transformers)
    # are consumed there, not handed to the attention function: drop them the same way.
    for name in _named_parameters(type(self)):
        kwargs.pop(name, None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query_states, key_states, value_states = _project(self, hidden_states, ("q_proj", "k_proj", "v_proj"))
    query_states, key_states = query_states.view(hidden_shape), key_states.view(hidden_shape)
    if hasattr(self, "q_norm"):  # Qwen3 normalises each head before the rotation
        query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
    query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)
    value_states = value_states.view(hidden_shape).transpose(1, 2)

    cos, sin = position_embeddings
    query_states, key_states = rope_qk(query_states, key_states, cos, sin)

    if is_segment_mask(attention_mask):  # a padding-free row (data.padding_free): attention per example
        attn_output = varlen_causal_attention(query_states, key_states, value_states, attention_mask,
                                              self.scaling, _sliding_window_kwargs(self).get("sliding_window"))
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), None

    attn_output, attn_weights = _attention_interface(self)(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **_sliding_window_kwargs(self),
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    attn_output = self.o_proj(attn_output)
    return attn_output, attn_weights


def _attention_patchable(module: nn.Module) -> str:
    """Empty when ``_attention_forward`` can stand in for ``module.forward``, else why not."""
    params = inspect.signature(type(module).forward).parameters
    names = list(params)
    if names[:2] != ["self", "hidden_states"] or "position_embeddings" not in params \
            or "attention_mask" not in params:
        return f"forward{inspect.signature(type(module).forward)} is not the expected one"
    if not ({"cache", "past_key_values"} & set(params)):
        return "its forward takes no KV cache argument"
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return "its forward takes no **kwargs"
    missing = [a for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "config")
               if not hasattr(module, a)]
    if missing:
        return f"it has no {', '.join(missing)}"
    modeling = sys.modules.get(type(module).__module__)
    if modeling is None or not hasattr(modeling, "ALL_ATTENTION_FUNCTIONS") \
            or not hasattr(modeling, "eager_attention_forward"):
        return f"{type(module).__module__} has no ALL_ATTENTION_FUNCTIONS / eager_attention_forward"
    return ""


def _bind(module: nn.Module, forward: Callable) -> None:
    # An instance attribute shadows the class's forward; parameters and state-dict keys stay as they are.
    module.forward = types.MethodType(forward, module)


def apply_fast_path(model: nn.Module, log: Callable[[str], None] = print) -> dict[str, int]:
    """Patch ``model`` in place with the fused kernels; returns how many modules each kernel took over.

    Keys: ``rms_norm``, ``rope`` (attention modules), ``swiglu`` (MLPs), ``lora_linear`` (projections),
    ``linear_cross_entropy`` (heads). Unsupported families return ``{}`` and stay on the plain path.
    Call after adapters are attached (LoRA modules present then are the ones fused).
    """
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type in MOE_TYPES:
        return _apply_moe_fast_path(model, model_type, log)
    if model_type not in SUPPORTED:
        log(f"fast path: {model_type} is not supported yet (Gemma needs GeGLU, (1+w) RMSNorm and "
            f"soft-capping); training on the plain path")
        return {}
    if is_fast(model):
        return fast_counts(model)
    found = pieces(model)
    counts = {"rms_norm": 0, "rope": 0, "swiglu": 0, "lora_linear": 0, "linear_cross_entropy": 0}
    notes = []

    for name, norm in found.norms:
        if isinstance(getattr(norm, "weight", None), torch.Tensor) and hasattr(norm, "variance_epsilon"):
            _bind(norm, _rms_norm_forward)
            counts["rms_norm"] += 1
        else:
            notes.append(f"{name}: RMSNorm without weight/variance_epsilon, plain forward")

    for name, attention in found.attention:
        why = _attention_patchable(attention)
        if why:
            notes.append(f"{name}: rope not patched ({why}); transformers' own RoPE")
            continue
        _bind(attention, _attention_forward)
        counts["rope"] += 1

    act = getattr(model.config, "hidden_act", None)
    for name, mlp in found.mlps:
        if act in _SILU and all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            _bind(mlp, _swiglu_forward)
            counts["swiglu"] += 1
        else:
            notes.append(f"{name}: not a SiLU gate/up/down MLP (hidden_act={act}), plain forward")

    plain_lora = []
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        base_trains = any(p.requires_grad for p in module.base_layer.parameters())
        if isinstance(module.dropout, nn.Identity) and not base_trains:
            module.fused = True
            counts["lora_linear"] += 1
        else:
            plain_lora.append(name)
    if plain_lora:
        # Dropout's mask (or a trainable base) needs more saved state than the fused backward keeps.
        notes.append(f"lora_linear: {len(plain_lora)} projections with dropout or a trainable base stay "
                     f"on the plain LoRALinear path")

    head = found.lm_head
    if isinstance(head, nn.Linear) and head.bias is None:
        counts["linear_cross_entropy"] = 1
    else:
        notes.append("linear_cross_entropy: the LM head is not a bias-free nn.Linear; plain loss")

    setattr(model, _COUNTS_ATTR, dict(counts))
    log(f"fast path: rms_norm {counts['rms_norm']} modules, rope {counts['rope']} attention modules, "
        f"swiglu {counts['swiglu']} MLPs, lora_linear {counts['lora_linear']} projections, "
        f"linear_cross_entropy {counts['linear_cross_entropy']} head")
    for note in notes:
        log(f"fast path: {note}")
    return counts


def fast_loss_sum(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """Summed cross-entropy of the labelled ``hidden`` rows [N, H] through the LM head without the full
    logits matrix, or None when the model's head is not fused (plain loss then)."""
    if not fast_counts(model).get("linear_cross_entropy"):
        return None
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None) or None
    return linear_cross_entropy(hidden, head.weight, targets, reduction="sum", softcap=softcap)


# MoE families: their norms, LoRA projections and LM head are the same as Llama's, so those kernels apply;
# their attention (DeepSeek's MLA with its own RoPE layout) and routed experts are not patched here — the
# experts run as grouped GEMMs in deftune.adapters.experts when expert methods wrap them.
MOE_TYPES = frozenset({"deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe"})


def _apply_moe_fast_path(model: nn.Module, model_type: str, log: Callable[[str], None]) -> dict[str, int]:
    if is_fast(model):
        return fast_counts(model)
    found = pieces(model)
    counts = {"rms_norm": 0, "rope": 0, "swiglu": 0, "lora_linear": 0, "linear_cross_entropy": 0}
    for _name, norm in found.norms:
        if isinstance(getattr(norm, "weight", None), torch.Tensor) and hasattr(norm, "variance_epsilon"):
            _bind(norm, _rms_norm_forward)
            counts["rms_norm"] += 1
    for _name, module in model.named_modules():
        if isinstance(module, LoRALinear) and isinstance(module.dropout, nn.Identity) and not any(
                p.requires_grad for p in module.base_layer.parameters()):
            module.fused = True
            counts["lora_linear"] += 1
    head = found.lm_head
    if isinstance(head, nn.Linear) and head.bias is None:
        counts["linear_cross_entropy"] = 1
    setattr(model, _COUNTS_ATTR, dict(counts))
    log(f"fast path ({model_type}, MoE): rms_norm {counts['rms_norm']} modules, lora_linear "
        f"{counts['lora_linear']} projections, linear_cross_entropy {counts['linear_cross_entropy']} head; "
        "attention and RoPE stay on transformers' code")
    return counts
