"""The expert-scoring job: ``deftune experts MODEL --data DOMAIN.jsonl``.

ESFT (Wang et al. 2024, arXiv:2407.01906) scores every routed expert of a Mixture-of-Experts model on a
domain's data -- the average gate score, or the token selection ratio -- and keeps, per layer, the top
experts whose scores add up to p. The selection it writes is what ``experts.select`` of methods esft and
expert-lora reads.
"""

from __future__ import annotations

from pathlib import Path

from deftune.adapters.experts.select import (
    format_table,
    plot_heatmap,
    routing_stats,
    select_experts,
    write_selection,
)
from deftune.config import load_recipe
from deftune.data import batches, read_records, to_samples, tokenize_samples
from deftune.data.tokenize import ensure_pad_token
from deftune.errors import DeftuneError
from deftune.models.load import load_model, resolve_device
from deftune.models.moe import require_moe


def score_domain(
    model_path: str,
    data: str,
    top_p: float = 0.2,
    score: str = "token",
    out: str = "",
    heatmap: str = "",
    device: str = "auto",
    max_records: int = 0,
    batch_size: int = 8,
    overrides: list[str] | tuple = (),
) -> dict:
    """``deftune experts``: ESFT's scores of every routed expert on ``data`` and the top-p selection.

    The records are rendered with the recipe's prompt template (``data.template``, seed by default) and
    every non-pad token of prompt and response counts, as in ESFT. Writes the selection JSON (``out``)
    and a PNG heatmap (``heatmap``; default: beside ``out``) and returns a summary dict.
    """
    if score not in ("gate", "token"):
        raise DeftuneError(f"--score must be gate or token, got {score!r}")
    if not 0 < top_p <= 1:
        raise DeftuneError(f"--top-p must be in (0, 1], got {top_p}")
    recipe = load_recipe(None, [f"model.path={model_path}", *overrides])
    # The data first: a wrong path or a malformed record should fail before the model loads.
    samples = to_samples(read_records(data), recipe.data.format)
    if max_records > 0:
        samples = samples[:max_records]
    dev = resolve_device(device)
    model, tokenizer, source = load_model(recipe.model, dev)
    ensure_pad_token(tokenizer)
    blocks = require_moe(model, "deftune experts")
    examples, stats = tokenize_samples(
        samples, tokenizer, recipe.data.template, recipe.data.max_length, recipe.data.system_prompt
    )
    if not examples:
        raise DeftuneError(f"{data}: no record fits data.max_length={recipe.data.max_length}")
    rows = batches(examples, batch_size, tokenizer.pad_token_id, seed=0, epoch=0, shuffle=False)
    routing = routing_stats(model, rows, blocks)
    selection = select_experts(routing, score, top_p)
    table = format_table(routing, score, selection)
    result = {
        "model": source.name,
        "records": len(examples),
        "tokens": routing.tokens,
        "score": score,
        "top_p": top_p,
        "selection": selection,
        "table": table,
        "selected": sum(len(v) for v in selection.values()),
        "experts": sum(b.num_experts for b in blocks),
    }
    if out:
        result["out"] = str(write_selection(Path(out), selection, routing, score, top_p, source.name, data))
    png = Path(heatmap) if heatmap else (Path(out).with_suffix(".png") if out else None)
    if png is not None:
        try:
            result["heatmap"] = str(plot_heatmap(routing, score, png, selection))
        except ImportError:
            result["heatmap_note"] = "no heatmap: matplotlib is missing (pip install 'deftune[monitor]')"
    return result
