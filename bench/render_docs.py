"""Render every results table in the docs from bench/results/*.json.

    .venv/bin/python bench/render_docs.py           # rewrite the tables in README.md and docs/performance.md
    .venv/bin/python bench/render_docs.py --check   # exit 1 naming each table that differs from its rendering

A table sits between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``; the text between the markers
is this script's rendering of NAME (``TABLES``) and nothing else, so a figure in the docs cannot drift
from the JSON its benchmark wrote. Every row names its source file. Figures are printed as the benchmark
wrote them (rounded for display at most); the one derived figure, a row's median tokens/s over the rounds
of a call, comes from ``bench/gpu_peers.py``'s own ``aggregate``, the function its targets were judged with.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from functools import cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
DOCS = (REPO / "README.md", REPO / "docs" / "performance.md", REPO / "docs" / "keys.md")

MARKER = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.DOTALL)

# The three calls that judge deftune against Unsloth (bench/gpu_peers.py), latest of each.
PEER_FILES = ("gpu_peers_llama-8b.json", "gpu_peers_llama-1b_16bit.json", "gpu_peers_llama-1b_4bit.json")


@cache
def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


@cache
def _gpu_peers():
    spec = importlib.util.spec_from_file_location("gpu_peers", HERE / "gpu_peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(HERE))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(HERE))
    return module


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("-" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _num(x, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def _src(name: str) -> str:
    return f"`{name}`"


def _precision(p: int) -> str:
    return "16-bit" if p == 16 else f"{p}-bit (NF4)"


def _recipe(row: dict) -> str:
    """A deftune row's recipe keys beyond the fast path itself, and its environment, as the row records them."""
    common = {"model.fast", "model.quantize", "train.offload_activations"}
    keys = [f"{k}={v}" for k, v in (row.get("recipe_keys_used") or {}).items() if k not in common]
    keys += [f"env {k}={v}" for k, v in (row.get("env") or {}).items()]
    return ", ".join(f"`{k}`" for k in keys) or "-"


def _rounds(name: str) -> int:
    return max((r.get("round", 1) for r in load(name)["rows"]), default=1)


def _peer_pairs(name: str):
    """(precision, targets, deftune row, peer row) per judged precision of a gpu_peers result."""
    data = load(name)
    rows = {r["name"]: r for r in _gpu_peers().aggregate(data["rows"])}
    for key, target in data["targets"].items():
        if target.get("met") is None:
            continue
        yield int(key.split("-")[0]), target, rows[target["deftune"]], rows[target["peer"]]


def speed() -> str:
    """The README's headline table: the latest call per workload, deftune against its peer."""
    header = ["workload", "deftune tok/s", "peak GiB", "against", "its tok/s", "its peak GiB", "speed",
              "card", "date", "source"]
    rows, commands = [], []
    for name in PEER_FILES:
        data = load(name)
        w = data["workload"]
        n = _rounds(name)
        for prec, target, ours, peer in _peer_pairs(name):
            rows.append([f"{w['shape']} shape, LoRA r16, {w['bs']} x {w['seq']} tokens, {_precision(prec)}"
                         + (f", median of {n} rounds" if n > 1 else ""),
                         _num(ours["tok_s"]), _num(ours["peak_gib"], 2), "Unsloth", _num(peer["tok_s"]),
                         _num(peer["peak_gib"], 2), f"{target['speed_ratio']}x", data["card"], data["date"],
                         _src(name)])
        commands.append((name, data["command"]))
    cpu = load("cpu_speed.json")
    v = cpu["versions"]
    rows.append([cpu["benchmark"].split(": ", 1)[1], _num(cpu["deftune"]["tokens_per_s"], 1), "-",
                 f"transformers {v['transformers']} + PEFT {v['peft']}", _num(cpu["hf_peft"]["tokens_per_s"], 1),
                 "-", f"{cpu['speedup']}x",
                 f"CPU ({cpu['machine']['cpu']}, {cpu['machine']['cores']} cores)", cpu["date"],
                 _src("cpu_speed.json")])
    commands.append(("cpu_speed.json", cpu["command"]))
    text = _table(header, rows) + "\n\nCommands, as each result records them:\n\n"
    return text + "\n".join(f"- {_src(n)}: `{c}`" for n, c in commands)


def peers() -> str:
    """Targets of the latest calls: median over rounds, largest peak, every round's ratio."""
    header = ["shape, precision", "deftune tok/s", "peak GiB", "Unsloth tok/s", "peak GiB", "speed",
              "per-round ratios", "speed >= 1.15x and peak <= Unsloth's", "deftune commit", "date", "source"]
    rows = []
    for name in PEER_FILES:
        data = load(name)
        w = data["workload"]
        for prec, target, ours, peer in _peer_pairs(name):
            ratios = " / ".join(f"{r}x" for r in target.get("round_ratios", [])) or "one round"
            rows.append([f"{w['shape']} bs {w['bs']}, {_precision(prec)}", _num(ours["tok_s"]),
                         _num(ours["peak_gib"], 2), _num(peer["tok_s"]), _num(peer["peak_gib"], 2),
                         f"{target['speed_ratio']}x", ratios, "met" if target["met"] else "not met",
                         data["versions"].get("deftune_git"), data["date"], _src(name)])
    return _table(header, rows)


def _rows_table(names: tuple[str, ...], host: bool) -> str:
    header = ["row", "round", "status", "tok/s", "peak GiB", "MFU"]
    header += ["host launch ms (fwd / bwd / opt / total)"] if host else []
    header += ["recipe beyond the fast path", "source"]
    rows = []
    for name in names:
        for r in load(name)["rows"]:
            row = [r["name"], r.get("round", 1), r.get("status"), _num(r.get("tok_s")),
                   _num(r.get("peak_gib"), 2), _num(r.get("mfu"), 3)]
            if host:
                h = r.get("host_launch_ms")
                row.append(" / ".join(_num(h[k], 1) for k in ("forward", "backward", "optimizer", "total"))
                           if h else "-")
            row += [_recipe(r) if r["name"].startswith("deftune") else "-", _src(name)]
            rows.append(row)
    return _table(header, rows)


def peers_rounds() -> str:
    """Every row of the target calls, round by round."""
    return _rows_table(PEER_FILES, host=True)


def variants_8b() -> str:
    return _rows_table(("gpu_peers_llama-8b_variants.json",), host=False)


def variants_1b() -> str:
    return _rows_table(("gpu_peers_llama-1b_variants.json",), host=False)


def ab_1b() -> str:
    return _rows_table(("gpu_peers_llama-1b_ab.json", "gpu_peers_llama-1b_adapter_function.json"), host=True)


def host_launch() -> str:
    name = "gpu_peers_llama-1b_hostlaunch.json"
    header = ["row", "tok/s", "wall ms a step (profiled)", "host launch ms (fwd / bwd / opt / total)",
              "kernel launches a step", "GPU busy ms a step", "compute stream idle ms a step", "source"]
    rows = []
    for r in load(name)["rows"]:
        h, p = r["host_launch_ms"], r["profile"]
        rows.append([r["name"], _num(r["tok_s"]), _num(p["wall_ms_per_step"], 1),
                     " / ".join(_num(h[k], 1) for k in ("forward", "backward", "optimizer", "total")),
                     _num(p["kernel_launches_per_step"]), _num(p["gpu_busy_ms_per_step"], 1),
                     _num(p["idle"]["idle_ms_per_step"], 1), _src(name)])
    return _table(header, rows)


def kernels() -> str:
    name = "kernels_vs_liger.json"
    data = load(name)
    header = ["shape", "op (forward + backward)", "deftune ms", "Liger ms", "PyTorch ms", "bitsandbytes ms",
              "torchao ms", "fastest", "source"]
    rows = []
    for shape, ops in data["shapes"].items():
        for op in ops:
            rows.append([shape, op["op"]] + [_num((op.get(k) or {}).get("ms"), 3)
                                             for k in ("deftune", "liger", "torch", "bitsandbytes", "torchao")]
                        + [op.get("fastest"), _src(name)])
    return _table(header, rows)


def loss_parity() -> str:
    name = "loss_parity.json"
    d = load(name)
    header = ["shape", "steps", "batch x seq", "largest per-step relative difference", "mean", "within 1%",
              "PEFT-loaded logits: max abs diff (max abs logit)", "card", "date", "source"]
    p = d["peft_loads_adapter"]
    return _table(header, [[d["shape"], d["steps"], f"{d['bs']} x {d['seq']}", f"{d['max_rel_diff']:.3%}",
                            f"{d['mean_rel_diff']:.3%}", "yes" if d["parity_within_1pct"] else "no",
                            f"{p['max_abs_logit_diff']} ({p['max_abs_logit']})", d["card"], d["date"],
                            _src(name)]])


def user_path() -> str:
    """bench/train_e2e.py: `deftune train` as a user runs it against Unsloth's documented path, per row:
    median tokens/s over the call's rounds and peaks, as the script's summary holds them."""
    rows = []
    for f in sorted(RESULTS.glob("train_e2e_*.json")):
        d = load(f.name)
        for r in d["summary"]:
            ratio = d["ratios"].get(r["name"], {}).get("median_ratio") if r.get("role") == "deftune" else None
            rows.append([r["name"], d["workload"].get("shape", ""), r["status"], _num(r.get("tok_s")),
                         "" if ratio is None else f"{ratio:.3f}x", _num(r.get("peak_alloc_gib"), 2),
                         _num(r.get("peak_reserved_gib"), 2), _num(r.get("host_rss_peak_gib"), 2),
                         d["card"], d["date"], _src(f.name)])
    if not rows:
        return "No result committed yet: `bash bench/gpu_issue6.sh OUTDIR` with `PARTS=e2e` on a GPU."
    return _table(["row", "shape", "status", "tokens/s", "vs Unsloth SFT", "alloc GiB", "reserved GiB",
                   "host RSS GiB", "card", "date", "source"], rows)


def cpu_speed() -> str:
    name = "cpu_speed.json"
    d = load(name)
    v = d["versions"]
    header = ["run", "tokens/s", "timed steps", "final loss", "versions", "machine", "date", "source"]
    machine = f"{d['machine']['cpu']}, {d['machine']['cores']} cores, {d['machine']['threads']} threads"
    rows = [["deftune", _num(d["deftune"]["tokens_per_s"], 1), d["deftune"]["timed_steps"],
             d["deftune"]["final_loss"], f"torch {v['torch']}", machine, d["date"], _src(name)],
            ["HF + PEFT", _num(d["hf_peft"]["tokens_per_s"], 1), d["hf_peft"]["steps"],
             d["hf_peft"]["final_loss"], f"transformers {v['transformers']}, peft {v['peft']}", machine,
             d["date"], _src(name)]]
    return _table(header, rows) + f"\n\ndeftune / HF + PEFT: {d['speedup']}x (`{d['command']}`)"


def gpu_demo() -> str:
    name = "gpu_demo_run.json"
    d = load(name)
    header = ["card", "steps", "tokens/s", "peak GiB", "eval loss before -> after", "torch", "date", "source"]
    return _table(header, [[d["card"], d["steps"], _num(d["tokens_per_s"], 1), d["peak_gib"],
                            f"{d['eval_loss_before']} -> {d['eval_loss_after']}", d["versions"]["torch"],
                            d["date"], _src(name)]])


def pcie() -> str:
    name = "pcie_bandwidth.json"
    d = load(name)
    header = ["card", "copy MiB", "host -> GPU GB/s", "GPU -> host GB/s", "both at once, GB/s each", "date",
              "source"]
    return _table(header, [[d["card"], d["mib"], d["h2d_gb_s"], d["d2h_gb_s"], d["both_directions_gb_s_each"],
                            d["date"], _src(name)]])


def adapters_proof() -> str:
    name = "adapters_proof.json"
    d = load(name)
    overrides = {}
    for run in d["runs"]:
        overrides.setdefault(run["config"], run["overrides"])
    header = ["run", "recipe overrides", "seeds", "held-out eval loss (mean ± sd)", "exact match (mean ± sd)",
              "adapter parameters", "source"]
    rows = []
    for config, t in d["table"].items():
        if config not in ("fixed", "dynamic"):
            continue
        rows.append([config, ", ".join(f"`{o}`" for o in overrides[config] if not o.startswith("eval.")),
                     len(t["steps_to_target"]), f"{t['eval_loss_mean']:.4f} ± {t['eval_loss_sd']:.4f}",
                     f"{t['exact_match_mean']:.1%} ± {t['exact_match_sd'] * 100:.1f}",
                     _num(t["adapter_params_mean"]), _src(name)])
    r = d["dynamic_vs_fixed"]
    return (_table(header, rows) + f"\n\ndynamic / fixed: eval loss {r['eval_loss_ratio']:.3f}x, adapter parameters "
            f"{r['adapter_params_ratio']:.3f}x; target (<= 1.02x and <= 0.60x) "
            f"{'met' if r['target_met'] else 'not met'} ({d['date']}, CPU, torch {d['machine']['torch']})")


def progressive() -> str:
    name = "adapters_proof.json"
    header = ["run", "recipe overrides", "seed", "first step with eval loss <= 0.1", "final eval loss",
              "exact match", "source"]
    rows = [[r["config"], ", ".join(f"`{o}`" for o in r["overrides"]), r["seed"], r["steps_to_target"],
             r["eval_loss"], f"{r['exact_match']:.1%}", _src(name)]
            for r in load(name)["runs"] if r["config"] in ("allatonce", "progressive")]
    return _table(header, rows)


def layer_selection() -> str:
    name = "layer_selection.json"
    d = load(name)
    header = ["adapter.layers", "trainable parameters", "median step s", "timed steps", "machine", "date",
              "source"]
    machine = f"{d['machine']['processor']}, {d['machine']['cpu_threads']} threads, torch {d['torch']}"
    rows = [[f"`{r['layers']}`", _num(r["trainable_params"]), r["median_step_s"], d["timed_steps"], machine,
             d["date"], _src(name)] for r in (d["all_layers"], d["top_4"])]
    return _table(header, rows) + f"\n\nSpeed-up of `top:4` over `all`: {d['speedup']}x."


def keys() -> str:
    """Every recipe key with its default and its meaning: the schema's own field comments
    (``deftune.config.field_docs``, what ``deftune keys`` prints), so the reference cannot drift either."""
    sys.path.insert(0, str(REPO / "src"))
    from deftune.config import Recipe, field_docs, recipe_to_dict

    defaults: dict = {}

    def flatten(tree: dict, prefix: str = "") -> None:
        for key, value in tree.items():
            if isinstance(value, dict) and f"{prefix}{key}" not in field_docs():
                flatten(value, f"{prefix}{key}.")
            else:
                defaults[f"{prefix}{key}"] = value

    flatten(recipe_to_dict(Recipe()))
    rows = [[f"`{key}`", f"`{json.dumps(defaults.get(key))}`", doc.replace("|", "\\|")]
            for key, doc in field_docs().items()]
    return _table(["key", "default", "meaning"], rows)


TABLES = {
    "keys": keys, "user-path": user_path,
    "speed": speed, "peers": peers, "peers-rounds": peers_rounds, "variants-8b": variants_8b,
    "variants-1b": variants_1b, "ab-1b": ab_1b, "host-launch": host_launch, "kernels": kernels,
    "loss-parity": loss_parity, "cpu-speed": cpu_speed, "gpu-demo": gpu_demo, "pcie": pcie,
    "adapters-proof": adapters_proof, "progressive": progressive, "layer-selection": layer_selection,
}


def render(text: str) -> str:
    """``text`` with every marked table replaced by its rendering; an unknown name is an error."""
    def one(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            raise KeyError(f"no renderer for table {name!r} (known: {', '.join(sorted(TABLES))})")
        return m.group(1) + TABLES[name]() + "\n" + m.group(4)

    return MARKER.sub(one, text)


def differing(text: str) -> list[str]:
    """Names of the tables in ``text`` whose committed body differs from their rendering."""
    return [m.group("name") for m, r in zip(MARKER.finditer(text), MARKER.finditer(render(text)))
            if m.group("body") != r.group("body")]


def check(paths=DOCS) -> list[str]:
    """``path: table`` for every table that differs from its rendering."""
    return [f"{Path(p).relative_to(REPO) if Path(p).is_relative_to(REPO) else p}: {name}"
            for p in paths for name in differing(Path(p).read_text())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs")
    args = ap.parse_args(argv)
    if args.check:
        stale = check()
        for line in stale:
            print(f"differs from its rendering: {line}")
        if stale:
            print("run `make docs` to render them from bench/results/")
        return 1 if stale else 0
    for path in DOCS:
        old = path.read_text()
        new = render(old)
        if new != old:
            path.write_text(new)
            print(f"rendered {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
