"""The run report: ``report.md`` and PNG plots built from a run folder's ``metrics.jsonl``.

``read_metrics`` sorts the log into kinds (train steps, evaluations, events, guard bands, update
heatmaps); ``build_report`` draws ``plots/{loss,lr,grad_norm,validation,update_heatmap}.png`` and writes
a Markdown page: run header, before/after table (``summary.json``), latest validation metrics, events,
and the modules whose relative update ``||W - W0||_F / ||W0||_F`` stayed far below the others', which
are candidates to drop from the next run's targets.

Plotting needs matplotlib (the ``monitor`` extra), imported lazily; figures render with the Agg canvas
directly, so no pyplot state or interactive backend is touched.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from deftune.errors import DeftuneError, require

KINDS = ("train", "eval", "events", "guard_band", "heatmap", "other", "truncated")
"""Keys of ``read_metrics``'s result. ``truncated`` holds the line number of a final line cut short."""

GENERATION_METRICS = ("exact_match", "token_f1", "bleu4", "rougeL")
EVAL_KEYS = ("eval_loss", "eval_ppl", *GENERATION_METRICS)
GRAD_BAND_WINDOW = 50
GRAD_BAND_SIGMAS = 3.0
MAX_LISTED_EVENTS = 20


# -- reading -------------------------------------------------------------------------------------
def _kind(record: dict) -> str:
    event = record.get("event")
    if event == "update_heatmap":
        return "heatmap"
    if event == "guard_band":
        return "guard_band"
    if event is not None:
        return "events"
    if any(k in record for k in EVAL_KEYS):
        return "eval"
    if "loss" in record:
        return "train"
    return "other"


def read_metrics(run_dir: str | Path) -> dict[str, list]:
    """Read ``run_dir/metrics.jsonl`` into lists of records by kind (see ``KINDS``), in file order.

    Unknown keys are kept. A malformed last line (a crash mid-write) is skipped and its line number
    put in ``truncated``; a malformed line anywhere else is a ``DeftuneError`` naming file and line.
    A resume marker (``{"event": "resume", "from_step": N}``) drops the records of steps after N logged
    before it: the resumed run redid those steps, so each step keeps its last value.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DeftuneError(f"No metrics log at {path}: is this a deftune run folder?")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    numbered = [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]
    out: dict[str, list] = {k: [] for k in KINDS}
    for pos, (lineno, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if pos == len(numbered) - 1:
                out["truncated"].append(lineno)
                continue
            raise DeftuneError(f"{path}, line {lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise DeftuneError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}")
        if record.get("event") == "resume" and _finite(record.get("from_step")):
            _drop_after(out, record["from_step"])
        out[_kind(record)].append(record)
    return out


def _drop_after(out: dict[str, list], step: float) -> None:
    """Remove the records of steps after ``step`` (redone by a resumed run) from every kind."""
    for kind, records in out.items():
        if kind != "truncated":
            records[:] = [r for r in records if not (_finite(r.get("step")) and r["step"] > step)]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``, sorted by step; a step logged twice (a resumed run) keeps the later
    value; missing and non-finite values are dropped."""
    by_step = {}
    for r in records:
        if "step" in r and _finite(r.get(key)):
            by_step[r["step"]] = float(r[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


# -- plots ---------------------------------------------------------------------------------------
def _mark_event_steps(ax, events: list[dict], kind: str, label: str, **style) -> None:
    """A vertical line at each step where an event of ``kind`` happened (labelled once for the legend)."""
    steps = [e["step"] for e in events if e.get("event") == kind and "step" in e]
    for i, step in enumerate(steps):
        ax.axvline(step, label=label if i == 0 else None, **style)


def _new_figure(width: float = 7.0, height: float = 4.0):
    require("matplotlib", "monitor", "Plotting the run report")
    # matplotlib: optional (extra `monitor`), only for plots
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # matplotlib: optional (extra `monitor`), only for plots

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _ticks(n: int, max_labels: int = 40) -> list[int]:
    stride = max(1, math.ceil(n / max_labels))
    return list(range(0, n, stride))


def save_heatmap_png(layers: list[int], modules: list[str], values: list[list[float | None]],
                     path: str | Path, title: str) -> Path:
    """Draw a layer x module image of ``values`` (rows = layers, columns = modules) with a colorbar;
    null or non-finite cells stay blank. Small grids get each value written in its cell."""
    _check_grid(layers, modules, values)
    grid = np.array([[v if _finite(v) else np.nan for v in row] for row in values], dtype=float)
    n_layers, n_modules = grid.shape
    fig = _new_figure(width=max(4.5, 0.7 * n_modules + 2.5), height=max(3.0, 0.32 * n_layers + 1.8))
    ax = fig.add_subplot()
    from matplotlib import colormaps  # matplotlib: optional (extra `monitor`), only for plots

    cmap = colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="||ΔW||_F / ||W0||_F")
    col_ticks, row_ticks = _ticks(n_modules), _ticks(n_layers)
    ax.set_xticks(col_ticks, [str(modules[i]) for i in col_ticks], rotation=45, ha="right")
    ax.set_yticks(row_ticks, [str(layers[i]) for i in row_ticks])
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(title)
    if n_layers * n_modules <= 64 and np.isfinite(grid).any():
        middle = np.nanmin(grid) + 0.5 * (np.nanmax(grid) - np.nanmin(grid))
        for (i, j), v in np.ndenumerate(grid):
            if math.isfinite(v):
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7,
                        color="black" if v > middle else "white")
    return _save(fig, Path(path))


def _plot_loss(train: list[dict], evals: list[dict], path: Path) -> Path | None:
    train_steps, train_loss = _series(train, "loss")
    eval_steps, eval_loss = _series(evals, "eval_loss")
    if not train_steps and not eval_steps:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    if train_steps:
        ax.plot(train_steps, train_loss, label="train loss", linewidth=1)
    if eval_steps:
        ax.plot(eval_steps, eval_loss, "o-", label="eval loss", linewidth=1.5, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _plot_lr(train: list[dict], events: list[dict], path: Path) -> Path | None:
    steps, lr = _series(train, "lr")
    if not steps:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.plot(steps, lr, linewidth=1, label="learning rate")
    _mark_event_steps(ax, events, "lr_reduced", "LR reduced",
                      color="tab:red", linestyle="--", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def grad_norm_band(steps: list[int], grad_norms: list[float], window: int = GRAD_BAND_WINDOW,
                   sigmas: float = GRAD_BAND_SIGMAS, min_count: int = 5, exclude: set[int] = frozenset()):
    """Rolling band ``max(0, mean - sigmas·std) .. mean + sigmas·std`` of the previous ``window`` grad
    norms at each step, as a spike guard sees it: the current step and the ``exclude``d (flagged)
    steps never enter the statistics. Steps with fewer than ``min_count`` earlier values get no band.
    Returns (steps, lower, upper)."""
    out_steps, lower, upper, history = [], [], [], []
    for step, norm in zip(steps, grad_norms):
        previous = history[-window:]
        if len(previous) >= min_count:
            mean, std = statistics.fmean(previous), statistics.pstdev(previous)
            out_steps.append(step)
            lower.append(max(0.0, mean - sigmas * std))
            upper.append(mean + sigmas * std)
        if step not in exclude:
            history.append(norm)
    return out_steps, lower, upper


def _plot_grad_norm(train: list[dict], events: list[dict], bands: list[dict], path: Path) -> Path | None:
    steps, norms = _series(train, "grad_norm")
    if not steps:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.plot(steps, norms, linewidth=1, label="grad norm")
    spikes = [e for e in events if e.get("event") == "grad_spike" and "step" in e]
    logged = sorted(
        ((b["step"], b["mean"], b["std"], b.get("k", GRAD_BAND_SIGMAS)) for b in bands
         if "step" in b and _finite(b.get("mean")) and _finite(b.get("std"))),
        key=lambda t: t[0],
    )
    if logged:
        band_steps = [s for s, *_ in logged]
        band_lo = [max(0.0, m - k * sd) for _, m, sd, k in logged]
        band_hi = [m + k * sd for _, m, sd, k in logged]
        label = "guard band (mean ± k·σ)"
    else:
        band_steps, band_lo, band_hi = grad_norm_band(steps, norms, exclude={e["step"] for e in spikes})
        label = f"rolling mean ± {GRAD_BAND_SIGMAS:g}σ ({GRAD_BAND_WINDOW} steps)"
    if band_steps:
        ax.fill_between(band_steps, band_lo, band_hi, color="tab:blue", alpha=0.15, step="mid", label=label)
    if spikes:
        y_of = dict(zip(steps, norms))
        xs = [e["step"] for e in spikes]
        ys = [e["grad_norm"] if _finite(e.get("grad_norm")) else y_of.get(e["step"], math.nan) for e in spikes]
        ax.scatter(xs, ys, marker="x", color="tab:red", s=50, zorder=3, label="flagged spike")
    _mark_event_steps(ax, events, "nonfinite", "non-finite value",
                      color="tab:orange", linestyle=":", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm")
    ax.set_title("Gradient norm")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _plot_validation(evals: list[dict], path: Path) -> Path | None:
    series = {m: _series(evals, m) for m in GENERATION_METRICS}
    series = {m: s for m, s in series.items() if s[0]}
    if not series:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    for metric, (steps, values) in series.items():
        ax.plot(steps, values, "o-", label=metric, linewidth=1.5, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("score")
    ax.set_title("Validation metrics")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


# -- update heatmap analysis ---------------------------------------------------------------------
def _check_grid(layers, modules, values) -> None:
    if len(values) != len(layers) or any(len(row) != len(modules) for row in values):
        raise DeftuneError(
            f"Update heatmap values must be {len(layers)} rows (layers) of {len(modules)} values "
            f"(modules); got {len(values)} rows of lengths {sorted({len(r) for r in values})}"
        )


def _grid(record: dict) -> tuple[list, list, list]:
    missing = [k for k in ("layers", "modules", "values") if not isinstance(record.get(k), list)]
    if missing:
        raise DeftuneError(f"Update heatmap record at step {record.get('step', '?')} lacks the lists {missing}")
    _check_grid(record["layers"], record["modules"], record["values"])
    return record["layers"], record["modules"], record["values"]


def ineffective_modules(heatmap_record: dict, fraction: float = 0.1) -> list[tuple[int, str, float]]:
    """(layer, module, value) of every cell whose relative update ``||ΔW||_F / ||W0||_F`` is below
    ``fraction`` x the median of all non-null values, in layer then module order."""
    layers, modules, values = _grid(heatmap_record)
    present = [v for row in values for v in row if _finite(v)]
    if not present:
        return []
    threshold = fraction * statistics.median(present)
    return [
        (layer, module, float(v))
        for layer, row in zip(layers, values)
        for module, v in zip(modules, row)
        if _finite(v) and v < threshold
    ]


# -- Markdown ------------------------------------------------------------------------------------
def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DeftuneError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    return data if isinstance(data, dict) else None


def _recipe_line(run_dir: Path) -> str | None:
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        return None
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None
    if not isinstance(recipe, dict):
        return None
    model = recipe.get("model")
    parts = []
    if recipe.get("method"):
        parts.append(f"method `{recipe['method']}`")
    if isinstance(model, dict) and model.get("path"):
        parts.append(f"model `{model['path']}`")
    return ", ".join(parts) or None


def _header(run_dir: Path, metrics: dict, summary: dict | None) -> list[str]:
    train = metrics["train"]
    summary = summary or {}
    lines = [f"# Run report: {run_dir.resolve().name}", "", f"- Run folder: `{run_dir}`"]
    recipe = _recipe_line(run_dir)
    if recipe:
        lines.append(f"- Recipe: {recipe}")
    steps = summary.get("steps")
    if steps is None and train:
        steps = max((r["step"] for r in train if "step" in r), default=None)
    if steps is not None:
        lines.append(f"- Steps: {_fmt(steps)}")
    seconds = summary.get("seconds")
    if seconds is None:
        elapsed = [r["elapsed_s"] for r in train if _finite(r.get("elapsed_s"))]
        seconds = max(elapsed) if elapsed else None
    if seconds is not None:
        lines.append(f"- Time: {seconds:,.1f} s ({seconds / 60:.1f} min)")
    tps = summary.get("tokens_per_s")
    if tps is not None:
        lines.append(f"- Throughput: {_fmt(float(tps))} tokens/s")
    else:
        rates = [r["tokens_per_s"] for r in train if _finite(r.get("tokens_per_s"))]
        if rates:
            lines.append(f"- Throughput: {_fmt(statistics.fmean(rates))} tokens/s (mean of logged steps)")
    trainable, total = summary.get("trainable_params"), summary.get("total_params")
    if trainable is not None:
        share = f" of {_fmt(total)} ({100 * trainable / total:.2f}%)" if total else ""
        lines.append(f"- Trainable parameters: {_fmt(trainable)}{share}")
    peaks = [r["peak_mem_gib"] for r in train if _finite(r.get("peak_mem_gib"))]
    if peaks:
        lines.append(f"- Peak memory: {max(peaks):.2f} GiB")
    if metrics["truncated"]:
        lines.append(f"- Note: the last line of metrics.jsonl (line {metrics['truncated'][0]}) was cut short "
                     "(the run probably stopped mid-write) and was skipped.")
    return lines


def _before_after(summary: dict | None) -> list[str]:
    lines = ["", "## Before / after", ""]
    before = (summary or {}).get("before") or {}
    after = (summary or {}).get("after") or {}
    if not before and not after:
        return [*lines, "No summary.json with before/after metrics (the run may not have finished)."]
    lines += ["| metric | before | after | change |", "|---|---:|---:|---:|"]
    for key in dict.fromkeys([*before, *after]):
        b, a = before.get(key), after.get(key)
        change = f"{a - b:+.4g}" if _finite(a) and _finite(b) else ""
        lines.append(f"| {key} | {_fmt(b) if key in before else ''} | {_fmt(a) if key in after else ''} "
                     f"| {change} |")
    return lines


def _validation(evals: list[dict], plot: Path | None) -> list[str]:
    lines = ["", "## Latest validation", ""]
    if not evals:
        return [*lines, "No evaluation was logged, so there is no validation plot."]
    latest = max(evals, key=lambda r: r.get("step", -1))
    lines += [f"At step {_fmt(latest.get('step'))}:", "", "| metric | value |", "|---|---:|"]
    for key in EVAL_KEYS:
        if key in latest:
            lines.append(f"| {key} | {_fmt(latest[key])} |")
    notes = []
    if "bleu_tokenizer" in latest:
        notes.append(f"BLEU tokenizer: `{latest['bleu_tokenizer']}`")
    if "rouge_tokenizer" in latest:
        notes.append(f"ROUGE tokenizer: `{latest['rouge_tokenizer']}`")
    if "samples" in latest:
        notes.append(f"samples: {_fmt(latest['samples'])}")
    if notes:
        lines += ["", "; ".join(notes) + "."]
    if plot is None:
        lines += ["", ("No generation metrics (exact match, token F1, BLEU, ROUGE) were logged, "
                       "so there is no validation plot.")]
    return lines


def _capped(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED_EVENTS])
    more = len(items) - MAX_LISTED_EVENTS
    return shown + (f", and {more} more" if more > 0 else "")


def _describe(e: dict) -> str:
    step = _fmt(e.get("step"))
    kind = e.get("event")
    if kind == "grad_spike":
        return (f"step {step} (grad norm {_fmt(e.get('grad_norm'))}, z = {_fmt(e.get('z'))}, "
                f"{e.get('action', '?')})")
    if kind == "nonfinite":
        return f"step {step} ({e.get('what', '?')}, {e.get('action', '?')})"
    if kind == "lr_reduced":
        return (f"step {step} ({e.get('metric', '?')} stalled: x{_fmt(e.get('factor'))}, "
                f"LR scale now {_fmt(e.get('lr_scale'))})")
    if kind == "resume":
        return f"at step {step}" + (f" from {e['checkpoint']}" if e.get("checkpoint") else "")
    extra = ", ".join(f"{k}={_fmt(v)}" for k, v in e.items() if k not in ("step", "event"))
    return f"step {step}" + (f" ({extra})" if extra else "")


def _events(events: list[dict]) -> list[str]:
    lines = ["", "## Events", ""]
    if not events:
        return [*lines, "No events were logged."]
    by_kind: dict[str, list[dict]] = {}
    for e in events:
        by_kind.setdefault(str(e["event"]), []).append(e)
    titles = {"grad_spike": "Gradient spikes", "nonfinite": "Non-finite values", "lr_reduced": "LR reductions",
              "resume": "Resumed"}
    for kind, title in titles.items():
        if kind in by_kind:
            lines.append(f"- {title}: {_capped([_describe(e) for e in by_kind[kind]])}")
    skipped = sorted({e["step"] for e in events if e.get("action") == "skip" and "step" in e})
    if skipped:
        lines.append(f"- Skipped steps ({len(skipped)}): {_capped([str(s) for s in skipped])}")
    for e in by_kind.get("early_stop", []):
        lines.append(f"- Early stop at step {_fmt(e.get('step'))} ({e.get('metric', '?')} stopped improving)")
    if "best" in by_kind:
        best = by_kind["best"][-1]
        lines.append(f"- Best checkpoint: step {_fmt(best.get('step'))}, "
                     f"{best.get('metric', '?')} = {_fmt(best.get('value'))}")
    if "augmented" in by_kind:
        parts = [f"epoch {_fmt(e.get('epoch'))}: {_fmt(e.get('replaced'))} of {_fmt(e.get('total'))}"
                 for e in by_kind["augmented"]]
        lines.append(f"- Augmented examples: {_capped(parts)}")
    known = {*titles, "early_stop", "best", "augmented"}
    for kind, group in by_kind.items():
        if kind not in known:
            lines.append(f"- {kind}: {_capped([_describe(e) for e in group])}")
    return lines


def _ineffective(heatmaps: list[dict], fraction: float) -> list[str]:
    lines = ["", "## Ineffective modules", ""]
    if not heatmaps:
        return [*lines, "No update heatmap was logged."]
    last = heatmaps[-1]
    cells = ineffective_modules(last, fraction)
    present = [v for row in last["values"] for v in row if _finite(v)]
    median = statistics.median(present) if present else math.nan
    lines.append(f"Relative update `||ΔW||_F / ||W0||_F` at step {_fmt(last.get('step'))} below "
                 f"{fraction:g} x the median ({_fmt(median)}):")
    lines.append("")
    if not cells:
        return [*lines, "None: every module moved at least that much."]
    lines += ["| layer | module | relative update |", "|---:|---|---:|"]
    lines += [f"| {layer} | `{module}` | {_fmt(v)} |" for layer, module, v in cells]
    counts = Counter(module for _, module, _ in cells)
    n_layers = len(last["layers"])
    per_module = ", ".join(f"`{m}` in {c} of {n_layers} layers" for m, c in counts.most_common())
    lines += ["", (f"By module: {per_module}. Modules that barely move are candidates to drop from the "
                   "adapter's targets (or layers) in the next run.")]
    return lines


def build_report(run_dir: str | Path, ineffective_fraction: float = 0.1) -> Path:
    """Write ``run_dir/report.md`` and its plots in ``run_dir/plots/``; return the report's path.
    Kinds of record that were never logged are skipped and the report says so."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    summary = _read_json(run_dir / "summary.json")
    plots = run_dir / "plots"
    train, evals, events = metrics["train"], metrics["eval"], metrics["events"]
    drawn = {
        "Loss": _plot_loss(train, evals, plots / "loss.png"),
        "Learning rate": _plot_lr(train, events, plots / "lr.png"),
        "Gradient norm": _plot_grad_norm(train, events, metrics["guard_band"], plots / "grad_norm.png"),
        "Validation metrics": _plot_validation(evals, plots / "validation.png"),
    }
    if metrics["heatmap"]:
        last = metrics["heatmap"][-1]
        drawn["Update heatmap"] = save_heatmap_png(
            *_grid(last), plots / "update_heatmap.png",
            f"Relative update ||ΔW||_F / ||W0||_F, step {last.get('step', '?')}",
        )
    lines = _header(run_dir, metrics, summary)
    lines += _before_after(summary)
    lines += _validation(evals, drawn["Validation metrics"])
    lines += _events(events)
    lines += _ineffective(metrics["heatmap"], ineffective_fraction)
    lines += ["", "## Plots", ""]
    for title, path in drawn.items():
        if path is not None:
            lines += [f"![{title}](plots/{path.name})", ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return report
