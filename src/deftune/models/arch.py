"""Architecture facts: which module of a Hugging Face causal LM plays which role.

Adapters, masks and kernels look modules up by *role* here (attention projection, MLP projection,
router, expert, norm, rotary embedding, LM head) and never hard-code names elsewhere. The rules are
structural (a linear layer inside a decoder layer's attention block is an attention projection), so
Llama, Qwen2/3, Mistral, Gemma 1-3, DeepSeek-V2/V3, Qwen-MoE, Mixtral and OLMoE share one code path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from deftune.models.nf4_linear import NF4Linear

ROLES = ("attention", "mlp", "router", "expert")
PRESETS = {
    "attention": {"attention"},
    "mlp": {"mlp"},
    "all-linear": {"attention", "mlp"},
}
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
_ATTENTION_PARTS = {"self_attn", "attention", "attn", "self_attention"}
_MLP_PARTS = {"mlp", "feed_forward", "block_sparse_moe", "ffn", "moe"}
_ROUTER_LEAVES = {"gate", "router", "gate_network"}


@dataclass(frozen=True)
class LinearSite:
    """One nn.Linear of a decoder layer: where it is and what it does."""

    name: str  # dotted path from the model root
    layer: int  # decoder layer index
    role: str  # attention | mlp | router | expert
    leaf: str  # last name component, e.g. q_proj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder layers (``model.model.layers`` for every supported family)."""
    for path in ("model.layers", "model.model.layers", "transformer.h", "model.decoder.layers"):
        node = model
        try:
            for part in path.split("."):
                node = getattr(node, part)
        except AttributeError:
            continue
        if isinstance(node, nn.ModuleList):
            return node
    raise ValueError(f"Cannot find the decoder layers of {type(model).__name__}")


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def classify(name: str) -> tuple[int, str] | None:
    """``(layer, role)`` of a linear module's dotted name, or None when it is outside the decoder
    layers (embeddings, LM head) or of no known role."""
    match = _LAYER_RE.search(name)
    if not match:
        return None
    layer = int(match.group(1))
    parts = name[match.end():].split(".")
    leaf = parts[-1]
    # Per-expert linears (older layouts: mlp.experts.3.w1) are the MoE issue's business, not presets'.
    if "experts" in parts and "shared_experts" not in parts and "shared_expert" not in parts:
        return layer, "expert"
    if any(p in _ATTENTION_PARTS for p in parts[:-1]):
        return layer, "attention"
    if any(p in _MLP_PARTS for p in parts[:-1]) or parts[0] in _MLP_PARTS:
        # A router is either the linear itself (mlp.gate) or a module wrapping one (mlp.router.layer in
        # JetMoE/DBRX, mlp.gate.wg in HunYuan-MoE): both are routers, never MLP projections.
        if leaf in _ROUTER_LEAVES or any(p in _ROUTER_LEAVES for p in parts[:-1]):
            return layer, "router"
        if "shared_expert_gate" == leaf:
            return layer, "router"
        return layer, "mlp"
    return None


def linear_sites(model: nn.Module) -> list[LinearSite]:
    """Every nn.Linear inside a decoder layer, with its role (LoRA-wrapped ones by their base name).
    A 4-bit NF4Linear (QLoRA base, model.quantize=nf4) counts as a linear layer too."""
    sites = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, NF4Linear)) or name.endswith((".lora_A", ".lora_B")):
            continue
        if name.endswith(".base_layer"):
            name = name[: -len(".base_layer")]
        found = classify(name)
        if found is None:
            continue
        layer, role = found
        sites.append(LinearSite(name=name, layer=layer, role=role, leaf=name.rsplit(".", 1)[-1]))
    return sites


def parse_layers(spec, n_layers: int) -> list[int]:
    """Layer selection: "all", "top:N" (the N closest to the output), "bottom:N", "A-B", or a list.

    Raises ValueError with the offending value so config errors can name it.
    """
    if spec is None or spec == "all":
        return list(range(n_layers))
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = [spec]
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith(("top:", "bottom:")):
            side, count = text.split(":", 1)
            try:
                k = int(count)
            except ValueError:
                raise ValueError(f"{spec!r}: the count after ':' must be an integer") from None
            if not 1 <= k <= n_layers:
                raise ValueError(f"{spec!r}: the model has {n_layers} layers")
            return list(range(n_layers - k, n_layers)) if side == "top" else list(range(k))
        if re.fullmatch(r"\d+\s*-\s*\d+", text):
            lo, hi = (int(x) for x in text.split("-"))
            spec = list(range(lo, hi + 1))
        elif re.fullmatch(r"\d+(\s*,\s*\d+)*", text):
            spec = [int(x) for x in text.split(",")]
        else:
            raise ValueError(f"{spec!r}: expected all, top:N, bottom:N, A-B or a list of layer indices")
    if isinstance(spec, (list, tuple)):
        out = []
        for item in spec:
            if isinstance(item, bool) or not isinstance(item, int):
                raise ValueError(f"{spec!r}: layer indices must be integers")
            index = item + n_layers if item < 0 else item
            if not 0 <= index < n_layers:
                raise ValueError(f"layer {item} is out of range: the model has {n_layers} layers")
            out.append(index)
        return sorted(set(out))
    raise ValueError(f"{spec!r}: expected all, top:N, bottom:N, A-B or a list of layer indices")


def select_sites(model: nn.Module, targets, layers) -> list[LinearSite]:
    """The linear modules chosen by ``targets`` (role presets joined by '+', or leaf/full names) and
    ``layers``. Raises ValueError naming anything that matches nothing."""
    sites = linear_sites(model)
    chosen_layers = set(parse_layers(layers, num_layers(model)))
    if isinstance(targets, str):
        names = [t.strip() for t in targets.split("+") if t.strip()]
    elif isinstance(targets, (list, tuple)):
        names = [str(t) for t in targets]
    else:
        raise ValueError(f"{targets!r}: expected a preset (attention, mlp, all-linear) or a list of names")
    roles: set[str] = set()
    leaves: set[str] = set()
    for name in names:
        if name in PRESETS:
            roles |= PRESETS[name]
        else:
            leaves.add(name)
    known_leaves = {s.leaf for s in sites}
    unknown = [n for n in leaves if n not in known_leaves and not any(s.name == n for s in sites)]
    if unknown:
        raise ValueError(
            f"no linear module named {', '.join(sorted(unknown))}; presets: {', '.join(PRESETS)}; "
            f"module names in this model: {', '.join(sorted(known_leaves))}"
        )
    picked = [
        s
        for s in sites
        if s.layer in chosen_layers and (s.role in roles or s.leaf in leaves or s.name in leaves)
    ]
    if not picked:
        raise ValueError(f"targets {targets!r} on layers {layers!r} select no module")
    return picked
