"""Which experts a domain uses: ESFT's relevance scores, top-p selection, and named selections.

ESFT (Wang et al. 2024, arXiv:2407.01906, section 3.2) scores expert i of layer l on a domain's data
D = {s_1..s_N} (sample s_j has L_j tokens; g_{i,k} is the gate value the router gives expert i for
token k, zero when i is not in the token's top-K):

    average gate score      g_i^l = 1/N * sum_j 1/L_j * sum_k g_{i,k}^l
    token selection ratio   r_i^l = sum_j sum_k 1[g_{i,k}^l > 0] / (K * sum_j L_j)

and keeps, per layer, the fewest experts whose scores (sorted, normalised to sum 1 over the layer's
experts) add up to at least p. Scores are normalised per layer as the paper defines them; ESFT's public
code normalises across layers instead, which changes how many experts each layer keeps.

A selection is ``{layer: [expert ids]}`` over the MoE layers; recipes name them per domain
(``experts: {domains: {cardiology: [0, 1, 5], oncology: oncology.json}, select: cardiology}``: ids, or a
file written by ``deftune experts``) or point ``experts.select`` at such a file directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deftune.errors import DeftuneError
from deftune.models.moe import MoeBlock

Selection = dict[int, list[int]]
SCORES = ("gate", "token")


@dataclass
class RoutingStats:
    """Per MoE layer (rows, in ``layers`` order) and expert (columns): ESFT's two scores."""

    layers: list[int]
    gate_score: torch.Tensor  # [n_layers, E]
    token_ratio: torch.Tensor  # [n_layers, E]
    samples: int
    tokens: int
    top_k: int

    def scores(self, kind: str) -> torch.Tensor:
        if kind not in SCORES:
            raise DeftuneError(f"score must be gate or token, got {kind!r}")
        return self.gate_score if kind == "gate" else self.token_ratio


@torch.no_grad()
def routing_stats(model: nn.Module, batches, blocks: list[MoeBlock]) -> RoutingStats:
    """Run ``model`` over ``batches`` (dicts with input_ids and attention_mask) and collect ESFT's scores
    from every router's own output (its top-K weights and indices, exactly what the experts receive)."""
    n_exp = blocks[0].num_experts
    gate_sum = torch.zeros(len(blocks), n_exp, dtype=torch.float64)
    picks = torch.zeros(len(blocks), n_exp, dtype=torch.float64)
    state: dict = {}

    def hook_for(row: int):
        def hook(_module, _inputs, output):
            weights, index = output[1], output[2]
            mask = state["mask"]  # [tokens] 1.0 for real tokens
            per_sample = state["per_sample"]  # [tokens] 1 / (L_j * N) weight of each token's sample
            dense = torch.zeros(index.shape[0], n_exp, dtype=torch.float64, device=index.device)
            dense.scatter_(1, index, weights.double())
            gate_sum[row] += (dense * per_sample[:, None]).sum(0).cpu()
            hits = torch.zeros_like(dense).scatter_(1, index, 1.0)
            picks[row] += (hits * mask[:, None]).sum(0).cpu()

        return hook

    handles = [b.router.register_forward_hook(hook_for(i)) for i, b in enumerate(blocks)]
    batches = list(batches)
    samples = sum(int(b["input_ids"].shape[0]) for b in batches)
    tokens = 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            attn = batch.get("attention_mask")
            attn = torch.ones_like(ids) if attn is None else attn.to(device)
            lengths = attn.sum(1, keepdim=True).clamp(min=1).double()
            state["mask"] = attn.reshape(-1).double()
            state["per_sample"] = (attn.double() / (lengths * samples)).reshape(-1)
            tokens += int(attn.sum())
            model(input_ids=ids, attention_mask=attn, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    top_k = blocks[0].top_k
    return RoutingStats(
        [b.layer for b in blocks],
        gate_sum.float(),
        (picks / max(tokens * top_k, 1)).float(),
        samples,
        tokens,
        top_k,
    )


def top_p_experts(scores: torch.Tensor, p: float) -> list[int]:
    """The fewest experts whose scores, normalised to sum 1, reach ``p`` (ties: lower id first)."""
    if not 0 < p <= 1:
        raise DeftuneError(f"top-p must be in (0, 1], got {p}")
    total = float(scores.sum())
    if total <= 0:
        return []
    share = scores.double() / total
    # Stable sort on the negated share: equal scores keep id order, so the choice is deterministic.
    order = torch.sort(-share, stable=True).indices.tolist()
    picked, acc = [], 0.0
    for e in order:
        picked.append(e)
        acc += float(share[e])
        if acc >= p - 1e-12:
            break
    return sorted(picked)


def select_experts(stats: RoutingStats, kind: str, p: float) -> Selection:
    scores = stats.scores(kind)
    return {layer: top_p_experts(scores[row], p) for row, layer in enumerate(stats.layers)}


def format_table(stats: RoutingStats, kind: str, selection: Selection | None = None) -> str:
    """A layer x expert table of the chosen score in percent; selected experts are starred."""
    scores = stats.scores(kind)
    n_exp = scores.shape[1]
    head = "layer " + "".join(f"{e:>7d}" for e in range(n_exp))
    lines = [f"{'average gate score' if kind == 'gate' else 'token selection ratio'} (%), * = selected", head]
    for row, layer in enumerate(stats.layers):
        chosen = set((selection or {}).get(layer, []))
        cells = "".join(
            f"{100 * float(scores[row, e]):6.1f}{'*' if e in chosen else ' '}" for e in range(n_exp)
        )
        lines.append(f"{layer:>5d} {cells}")
    return "\n".join(lines)


def plot_heatmap(stats: RoutingStats, kind: str, path: Path, selection: Selection | None = None) -> Path:
    import matplotlib  # matplotlib: optional (extra `monitor`), only for plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: optional (extra `monitor`), only for plots

    scores = stats.scores(kind).numpy()
    fig, ax = plt.subplots(
        figsize=(max(4.0, 0.35 * scores.shape[1] + 2), max(2.5, 0.35 * len(stats.layers) + 1.5))
    )
    im = ax.imshow(scores, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(stats.layers)), [str(x) for x in stats.layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title("average gate score" if kind == "gate" else "token selection ratio")
    for row, layer in enumerate(stats.layers):
        for e in (selection or {}).get(layer, []):
            ax.add_patch(
                plt.Rectangle((e - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5)
            )
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_selection(
    path: Path, selection: Selection, stats: RoutingStats, kind: str, p: float, model: str, data: str
) -> Path:
    doc = {
        "format": "deftune-expert-selection",
        "version": 1,
        "model": model,
        "data": data,
        "score": kind,
        "top_p": p,
        "samples": stats.samples,
        "tokens": stats.tokens,
        "selection": {str(k): v for k, v in selection.items()},
        "gate_score": {
            str(layer): [round(float(x), 6) for x in stats.gate_score[row]]
            for row, layer in enumerate(stats.layers)
        },
        "token_ratio": {
            str(layer): [round(float(x), 6) for x in stats.token_ratio[row]]
            for row, layer in enumerate(stats.layers)
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return path


def _as_selection(value, where: str) -> Selection | list[int]:
    """A list of ids (all MoE layers) or a {layer: [ids]} mapping, checked for shape."""

    def ids(v, w):
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v]
        if not isinstance(v, (list, tuple)) or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in v
        ):
            raise DeftuneError(f"{w}: expected a list of expert ids, got {v!r}")
        return sorted(set(v))

    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            try:
                layer = int(k)
            except (TypeError, ValueError):
                raise DeftuneError(f"{where}: layer keys must be integers, got {k!r}") from None
            out[layer] = ids(v, f"{where}.{k}")
        return out
    return ids(value, where)


def read_selection_file(path: Path) -> Selection:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DeftuneError(f"{path}: cannot read the expert selection: {exc}") from exc
    if not isinstance(doc, dict) or "selection" not in doc:
        raise DeftuneError(
            f"{path}: not an expert selection file (no 'selection' key); write one with "
            "`deftune experts MODEL --data DOMAIN.jsonl --out FILE`"
        )
    found = _as_selection(doc["selection"], f"{path}: selection")
    if not isinstance(found, dict):
        raise DeftuneError(f"{path}: selection must map layer -> expert ids")
    return found


def resolve_selection(domains: dict, select: str, blocks: list[MoeBlock]) -> Selection:
    """The selection a recipe asks for (``experts.select``: a domain of ``experts.domains`` or a file),
    checked against the model: MoE layers only, ids in range. Layers left out train nothing."""
    if not select:
        raise DeftuneError(
            "experts.select is empty: name a domain of experts.domains "
            f"({', '.join(map(str, domains)) or 'none defined'}) or a selection file from "
            "`deftune experts`"
        )
    if select in domains and isinstance(domains[select], str):
        # A domain named after a selection file: {cardiology: cardiology.json}.
        path = Path(domains[select])
        if not path.is_file():
            raise DeftuneError(f"experts.domains.{select}: selection file {path} not found")
        raw, where = read_selection_file(path), str(path)
    elif select in domains:
        raw = _as_selection(domains[select], f"experts.domains.{select}")
        where = f"experts.domains.{select}"
    elif Path(select).suffix == ".json" or Path(select).is_file():
        if not Path(select).is_file():
            raise DeftuneError(f"experts.select: selection file {select} not found")
        raw = read_selection_file(Path(select))
        where = select
    else:
        raise DeftuneError(
            f"experts.select: {select!r} is neither a domain of experts.domains "
            f"({', '.join(map(str, domains)) or 'none defined'}) nor a selection file"
        )
    by_layer = {b.layer: b for b in blocks}
    if isinstance(raw, list):
        raw = {layer: raw for layer in by_layer}
    out: Selection = {}
    for layer, experts in raw.items():
        if layer not in by_layer:
            raise DeftuneError(
                f"{where}: layer {layer} has no routed experts; MoE layers: "
                f"{', '.join(map(str, sorted(by_layer)))}"
            )
        n = by_layer[layer].num_experts
        bad = [e for e in experts if not 0 <= e < n]
        if bad:
            raise DeftuneError(f"{where}: expert ids {bad} out of range for layer {layer} ({n} experts)")
        if experts:
            out[layer] = list(experts)
    if not out:
        raise DeftuneError(f"{where}: selects no expert")
    return out
