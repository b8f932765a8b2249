"""Jobs on a finished run (or any model): load it, evaluate it, generate with it, merge it.

``deftune eval``, ``deftune generate`` and ``deftune merge``: each reads the run's recipe, asks the
method registry how the run's result goes back onto its base model, and does its one thing.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from safetensors import SafetensorError
from transformers import TextStreamer

from deftune.adapters.methods import get_method
from deftune.config import Recipe, load_recipe, parse_override, recipe_from_dict, recipe_to_dict, set_dotted
from deftune.data import read_records, to_samples, tokenize_samples
from deftune.data.templates import prompt_for_generation
from deftune.data.tokenize import ensure_pad_token
from deftune.errors import DeftuneError
from deftune.eval.generation import generate_texts
from deftune.eval.validate import validation_metrics
from deftune.models.load import check_model, load_model, resolve_device
from deftune.models.quantize import dequantize_model


def inference_recipe(run_or_model: str, overrides: list[str] | tuple = (),
                     trust_remote_code: bool = False) -> tuple[Recipe, Path | None]:
    """``(recipe, run folder or None)`` for a run folder or anything ``model.path`` accepts, with the
    model's files checked (nothing loaded yet).

    A run folder's recipe.yaml may have been written by someone else, so its ``model.trust_remote_code``
    is ignored: a model folder's own code runs only when the caller passes ``trust_remote_code=True``
    (``--trust-remote-code``) or types ``model.trust_remote_code=true`` among ``overrides``.
    """
    run = Path(run_or_model).expanduser()
    if (run / "recipe.yaml").is_file():
        try:
            tree = yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise DeftuneError(f"{run / 'recipe.yaml'} is not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise DeftuneError(f"{run / 'recipe.yaml'} does not hold a recipe (a YAML mapping)")
    else:
        run = None
        tree = recipe_to_dict(load_recipe(None, [f"model.path={run_or_model}"]))
    tree.setdefault("model", {})["trust_remote_code"] = bool(trust_remote_code)
    # The run's caps on its training data do not apply to the data given to this command; a cap typed
    # among ``overrides`` does.
    data = tree.setdefault("data", {})
    data["max_train_records"] = data["max_eval_records"] = 0
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
    recipe = recipe_from_dict(tree)
    check_model(recipe.model.path)
    return recipe, run


def _load(recipe: Recipe, run: Path | None, device: str):
    dev = resolve_device(device)
    if run is not None:
        model, tokenizer = get_method(recipe.method).load(recipe, run, dev)
    else:
        model, tokenizer, _ = load_model(recipe.model, dev)
    ensure_pad_token(tokenizer)
    model.eval()
    return model, tokenizer


def load_for_inference(run_or_model: str, device: str = "auto", trust_remote_code: bool = False):
    """``(model, tokenizer, recipe)`` from a run folder (base + its adapter or tuned weights) or from
    anything ``model.path`` accepts (then recipe is the default recipe with that model).

    The model folder's own Python code (``auto_map``) runs only with ``trust_remote_code=True``; a run
    folder's recipe.yaml never turns it on."""
    recipe, run = inference_recipe(run_or_model, (), trust_remote_code)
    model, tokenizer = _load(recipe, run, device)
    return model, tokenizer, recipe


def evaluate(run_or_model: str, data: str, device: str = "auto", overrides: list[str] | tuple = (),
             max_records: int = 0, trust_remote_code: bool = False) -> dict:
    """Eval loss, perplexity and the generation metrics of ``eval.metrics`` on ``data``.

    Every record of ``data`` is scored (the run's ``data.max_*_records`` and ``eval_fraction`` apply to
    training, not here) unless ``max_records`` > 0 (or ``data.max_eval_records=N`` among ``overrides``)
    keeps the first N. ``overrides``: ``key=value`` strings applied to the run's recipe (e.g.
    ``eval.samples=50``). The data is read and checked before the model loads.
    """
    if max_records < 0:
        raise DeftuneError(f"--max-records must be >= 0 (0 = every record), got {max_records}")
    recipe, run = inference_recipe(run_or_model, overrides, trust_remote_code)
    samples = to_samples(read_records(data), recipe.data.format)
    limit = max_records or recipe.data.max_eval_records
    if limit:
        samples = samples[:limit]
    if not samples:
        raise DeftuneError(f"{data}: no records to score")
    model, tokenizer = _load(recipe, run, device)
    examples, _ = tokenize_samples(samples, tokenizer, recipe.data.template, recipe.data.max_length,
                                       recipe.data.system_prompt)
    dev = next(model.parameters()).device
    metrics, _ = validation_metrics(model, tokenizer, examples, samples, recipe, dev,
                                    recipe.eval.final_samples or recipe.eval.samples)
    metrics["records"] = len(examples)
    skipped = len(samples) - len(examples)
    if skipped:
        metrics["records_skipped"] = skipped  # prompt longer than data.max_length
    return metrics


def generate(run_or_model: str, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, raw: bool = False, stream: bool = False,
             device: str = "auto", trust_remote_code: bool = False) -> str:
    """Answer ``prompt`` with the run's prompt template (``raw`` sends the text as is).

    temperature 0 is greedy; otherwise sampling with the given temperature / top-p / top-k.
    """
    model, tokenizer, recipe = load_for_inference(run_or_model, device, trust_remote_code)
    text = prompt if raw else prompt_for_generation(prompt, tokenizer, recipe.data.template,
                                                    recipe.data.system_prompt)
    streamer = None
    if stream:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = generate_texts(model, tokenizer, [text], max_new_tokens, batch_size=1, do_sample=temperature > 0,
                         temperature=temperature or 1.0, top_p=top_p, top_k=top_k, streamer=streamer)
    return out[0]


def merge(run: str, out: str, device: str = "cpu", trust_remote_code: bool = False) -> Path:
    """Merge a run's trained update into its base weights; save a plain Hugging Face folder at ``out``.

    What merges is the method's (``Method.merge``): LoRA writes W0 + s B A, expert-LoRA folds
    s B_e A_e into each selected expert, ESFT's patch is already in the weights. A QLoRA run
    (``model.quantize=nf4``, Dettmers et al. 2023, arXiv:2305.14314) merges into the dequantized base:
    each 4-bit linear becomes a full-precision nn.Linear (model.dtype) holding

        W_merged = dequant(W) + s B A        (dequant(W) alone where no adapter sits)

    so the merged model computes what was trained, the adapters having learned around the quantization
    error. The folder is an ordinary full-precision checkpoint that loads normally (model.quantize=none);
    as is usual with QLoRA, the merge is shipped in 16/32 bits, not 4.
    """
    recipe, run_dir = inference_recipe(run, (), trust_remote_code)
    if run_dir is None:
        raise DeftuneError(f"{run} is not a run folder (no recipe.yaml): merge needs a finished run")
    out_path = Path(out).expanduser()
    try:  # before the model loads: an unwritable --out fails at once
        out_path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DeftuneError(f"Cannot create the merge output folder {out_path}: {exc.strerror or exc}") from None
    model, tokenizer = _load(recipe, run_dir, device)
    merged = get_method(recipe.method).merge(model)
    if merged == 0:
        raise DeftuneError(f"{run}: no LoRA modules to merge")
    dequantize_model(model)  # 4-bit layers without an adapter: plain dequant(W), so nothing 4-bit is saved
    try:
        model.save_pretrained(out_path, safe_serialization=True)
        tokenizer.save_pretrained(out_path)
    except (OSError, SafetensorError) as exc:  # a full disk, a lost mount
        raise DeftuneError(f"Could not write the merged model to {out_path}: "
                           f"{getattr(exc, 'strerror', None) or exc}") from None
    return out_path
