"""Jobs on a finished run (or any model): load it, evaluate it, generate with it, merge it.

``deftune eval``, ``deftune generate`` and ``deftune merge``: each reads the run's recipe, asks the
method registry how the run's result goes back onto its base model, and does its one thing.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from transformers import TextStreamer

from deftune.adapters.methods import get_method
from deftune.config import load_recipe, parse_override, recipe_from_dict, recipe_to_dict, set_dotted
from deftune.data import prepare_data
from deftune.data.templates import prompt_for_generation
from deftune.data.tokenize import ensure_pad_token
from deftune.errors import DeftuneError
from deftune.eval.generation import generate_texts
from deftune.eval.validate import validation_metrics
from deftune.models.load import load_model, resolve_device
from deftune.models.quantize import dequantize_model


def load_for_inference(run_or_model: str, device: str = "auto"):
    """``(model, tokenizer, recipe)`` from a run folder (base + its adapter or tuned weights) or from
    anything ``model.path`` accepts (then recipe is the default recipe with that model)."""
    dev = resolve_device(device)
    run = Path(run_or_model)
    if (run / "recipe.yaml").is_file():
        recipe = recipe_from_dict(yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8")))
        model, tokenizer = get_method(recipe.method).load(recipe, run, dev)
    else:
        recipe = load_recipe(None, [f"model.path={run_or_model}"])
        model, tokenizer, _ = load_model(recipe.model, dev)
    ensure_pad_token(tokenizer)
    model.eval()
    return model, tokenizer, recipe


def evaluate(run_or_model: str, data: str, device: str = "auto", overrides: list[str] | tuple = ()) -> dict:
    """Eval loss, perplexity and the generation metrics of ``eval.metrics`` on ``data``."""
    model, tokenizer, recipe = load_for_inference(run_or_model, device)
    if overrides:
        tree = recipe_to_dict(recipe)
        for text in overrides:
            key, value = parse_override(text)
            set_dotted(tree, key, value)
        recipe = recipe_from_dict(tree)
    # Every record of `data` is scored: it is read as the eval split.
    recipe.data.train = data
    recipe.data.eval = data
    prepared = prepare_data(recipe.data, tokenizer)
    dev = next(model.parameters()).device
    metrics, _ = validation_metrics(model, tokenizer, prepared.eval, prepared.eval_samples, recipe, dev,
                                    recipe.eval.final_samples or recipe.eval.samples)
    metrics["records"] = len(prepared.eval)
    return metrics


def generate(run_or_model: str, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, raw: bool = False, stream: bool = False,
             device: str = "auto") -> str:
    """Answer ``prompt`` with the run's prompt template (``raw`` sends the text as is).

    temperature 0 is greedy; otherwise sampling with the given temperature / top-p / top-k.
    """
    model, tokenizer, recipe = load_for_inference(run_or_model, device)
    text = prompt if raw else prompt_for_generation(prompt, tokenizer, recipe.data.template,
                                                    recipe.data.system_prompt)
    streamer = None
    if stream:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = generate_texts(model, tokenizer, [text], max_new_tokens, batch_size=1, do_sample=temperature > 0,
                         temperature=temperature or 1.0, top_p=top_p, top_k=top_k, streamer=streamer)
    return out[0]


def merge(run: str, out: str, device: str = "cpu") -> Path:
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
    model, tokenizer, recipe = load_for_inference(run, device)
    if (Path(run) / "recipe.yaml").is_file():
        merged = get_method(recipe.method).merge(model)
    else:
        merged = 0
    if merged == 0:
        raise DeftuneError(f"{run}: no LoRA modules to merge")
    dequantize_model(model)  # 4-bit layers without an adapter: plain dequant(W), so nothing 4-bit is saved
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_path, safe_serialization=True)
    tokenizer.save_pretrained(out_path)
    return out_path
