"""The `deftune` command: thin verbs over deftune.api.

    deftune train [RECIPE.yaml] [key=value ...]      (no recipe: the bundled demo recipe)
    deftune eval RUN_OR_MODEL --data FILE [--json] [--max-records N] [key=value ...]
    deftune generate RUN_OR_MODEL "prompt" [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K]
    deftune merge RUN --out DIR
    deftune experts MODEL --data DOMAIN.jsonl [--top-p 0.2] [--score token|gate] [--out experts.json]
    deftune report RUN                               (rebuild report.md + plots from metrics.jsonl)
    deftune keys                                     (every recipe key with its meaning)

eval, generate, merge and experts take ``--trust-remote-code`` to let a model folder's own Python code
(``auto_map``) run; a run folder's recipe.yaml never turns it on.

Exit codes:
    0    ok
    2    user error (bad recipe, data, path...): one line on stderr, no traceback
    130  interrupted by Ctrl-C (SIGINT); a training run saved a checkpoint to resume from
    143  stopped by SIGTERM; a training run saved a checkpoint to resume from
    1    internal error (a bug): a short message and the file holding the full traceback
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
import time
import traceback

from deftune import api
from deftune.config import field_docs
from deftune.errors import DeftuneError
from deftune.recipes.experts_score import score_domain
from deftune.training.loop import TrainingInterrupted
from deftune.training.report import build_report

EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 130, 143
EXIT_CODES = """exit codes:
  0    ok
  2    user error (bad recipe, data, path...): one line on stderr
  130  interrupted by Ctrl-C (SIGINT); a training run saved a checkpoint to resume from
  143  stopped by SIGTERM; a training run saved a checkpoint to resume from
  1    internal error: a short message and the file holding the full traceback"""
TRUST_HELP = "let the model folder's own Python code (auto_map) run; never taken from a run folder"


def _split_recipe(args: list[str]) -> tuple[str | None, list[str]]:
    recipe = None
    overrides = []
    for arg in args:
        if "=" in arg:
            overrides.append(arg)
        elif recipe is None:
            recipe = arg
        else:
            raise DeftuneError(f"Unexpected argument {arg!r}: give one recipe file and key=value overrides")
    return recipe, overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deftune", description="Fine-tune language models fast.",
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("train", help="train from a recipe (default: the demo recipe)")
    p.add_argument("args", nargs="*", help="[RECIPE.yaml] [key=value ...]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser("eval", help="eval loss, perplexity and task score of a run or model on a data file")
    p.add_argument("target", help="run folder, model folder, .gguf file or 'default'")
    p.add_argument("--data", required=True, help="data file, folder, hub id, 'demo' or 'demo-eval'")
    p.add_argument("--json", action="store_true", help="print one JSON object (on failure: {\"error\": ...})")
    p.add_argument("--max-records", type=int, default=0, help="score only the first N records (0: every one)")
    p.add_argument("--device", default="auto")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides (e.g. eval.samples=50)")
    p = sub.add_parser("generate", help="answer a prompt with a run or model (streams to the terminal)")
    p.add_argument("target")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="send the prompt without the run's template")
    p.add_argument("--device", default="auto")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p = sub.add_parser("merge", help="merge a LoRA run into its base model (plain Hugging Face folder)")
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p = sub.add_parser("experts", help="score a MoE model's experts on domain data (ESFT) and select them")
    p.add_argument("model", help="model folder, .gguf file or hub id")
    p.add_argument("--data", required=True, help="the domain's data file")
    p.add_argument("--top-p", type=float, default=0.2, help="per layer, keep experts until their scores reach p")
    p.add_argument("--score", default="token", choices=["token", "gate"],
                   help="token selection ratio (default) or average gate score")
    p.add_argument("--out", default="", help="write the selection JSON here (and a .png heatmap beside it)")
    p.add_argument("--heatmap", default="", help="heatmap PNG path (default: --out with .png)")
    p.add_argument("--max-records", type=int, default=0, help="score only the first N records")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p = sub.add_parser("report", help="rebuild report.md and plots of a run from its metrics.jsonl")
    p.add_argument("run")
    sub.add_parser("keys", help="list every recipe key with its meaning")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "httpx", "huggingface_hub", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    parser = build_parser()
    # key=value overrides may come after options (`eval RUN --data F --json k=v`), which argparse's
    # positional matching does not allow: collect them from the leftovers.
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if "=" not in x or x.startswith("-")]
    if stray or (extra and args.verb not in ("eval", "train", "experts")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if args.verb == "eval":
        args.overrides = list(args.overrides) + extra
    elif args.verb == "train":
        args.args = list(args.args) + extra
    elif args.verb == "experts":
        args.overrides = extra
    try:
        return _dispatch(args)
    except TrainingInterrupted as exc:
        print(f"deftune: {exc}", file=sys.stderr)
        return _interrupted_exit(exc)
    except DeftuneError as exc:
        return _fail(args, str(exc), EXIT_USER)
    except KeyboardInterrupt:
        return _fail(args, "interrupted", EXIT_SIGINT)
    except Exception as exc:  # noqa: BLE001 - a bug: a short message, the traceback in a file
        where = _write_traceback()
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        return _fail(args, f"internal error ({type(exc).__name__}: {first}); full traceback in {where}. "
                     "Please report it with that file.", EXIT_INTERNAL)


def _fail(args, message: str, code: int) -> int:
    """One line on stderr; with ``--json`` also ``{"error": ...}`` on stdout, for scripts."""
    print(f"deftune: error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": message, "exit_code": code}))
    return code


def _interrupted_exit(exc: TrainingInterrupted) -> int:
    """130 for SIGINT, 143 for SIGTERM (128 + the signal's number, as a shell reports it)."""
    signum = getattr(exc, "signal_number", None)
    if signum is None:  # raised without the number: its message names the signal
        signum = signal.SIGINT if "SIGINT" in str(exc) else signal.SIGTERM
    return 128 + int(signum)


def _write_traceback() -> str:
    """Write the current exception's traceback to a temporary file and return its path."""
    try:
        fd, path = tempfile.mkstemp(prefix=f"deftune-error-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".txt")
        with open(fd, "w", encoding="utf-8") as fh:
            fh.write(f"deftune {' '.join(sys.argv[1:])}\n\n")
            traceback.print_exc(file=fh)
        return path
    except OSError:  # nowhere to write it: the traceback goes to stderr after all
        traceback.print_exc()
        return "the output above"


def _dispatch(args) -> int:
    if args.verb == "train":
        recipe, overrides = _split_recipe(args.args)
        summary = api.train(recipe, overrides, progress=not args.no_progress)
        api.print_summary(summary)
    elif args.verb == "eval":
        metrics = api.evaluate(args.target, args.data, device=args.device, overrides=args.overrides,
                               max_records=args.max_records, trust_remote_code=args.trust_remote_code)
        if args.json:
            print(json.dumps(metrics))
        else:
            for key, value in metrics.items():
                print(f"{key}: {value}")
    elif args.verb == "generate":
        text = api.generate(args.target, args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                            args.top_k, raw=args.raw, stream=sys.stdout.isatty(), device=args.device,
                            trust_remote_code=args.trust_remote_code)
        if not sys.stdout.isatty():
            print(text)
    elif args.verb == "merge":
        out = api.merge(args.run, args.out, trust_remote_code=args.trust_remote_code)
        print(f"Merged model saved to {out}")
    elif args.verb == "experts":
        overrides = [*args.overrides, *(["model.trust_remote_code=true"] if args.trust_remote_code else [])]
        result = score_domain(args.model, args.data, args.top_p, args.score, args.out, args.heatmap, args.device,
                              args.max_records, args.batch_size, overrides)
        print(result["table"])
        print(f"Selected {result['selected']} of {result['experts']} routed experts "
              f"({result['score']} score, top-p {result['top_p']}, {result['records']} records, "
              f"{result['tokens']} tokens)")
        for key in ("out", "heatmap", "heatmap_note"):
            if key in result:
                print(f"{key}: {result[key]}")
    elif args.verb == "report":
        print(f"Report written to {build_report(args.run)}")
    elif args.verb == "keys":
        for key, doc in field_docs().items():
            print(f"{key:<28} {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
