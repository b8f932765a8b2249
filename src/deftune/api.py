"""The Python API; the CLI verbs are thin wrappers over these functions.

    import deftune
    summary = deftune.train("my_recipe.yaml", ["train.max_steps=100"])
    print(deftune.evaluate("runs/demo", data="demo-eval"))
    print(deftune.generate("runs/demo", "Convert this date to ISO 8601: 5 March 2021"))
    deftune.merge("runs/demo", out="merged/")
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deftune.config import (
    Recipe,
    _set_dotted,
    load_recipe,
    parse_override,
    recipe_from_dict,
    recipe_to_dict,
    save_recipe,
)
from deftune.errors import DeftuneError


@dataclass
class RunSummary:
    run_dir: str
    method: str
    steps: int
    seconds: float
    tokens_per_s: float
    trainable_params: int
    total_params: int
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)
    output: str = ""
    skipped_steps: int = 0
    final_trainable_params: int = 0
    report: str = ""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeftuneError("device=cuda but no CUDA GPU is available; use device=auto or device=cpu")
    return torch.device(name)


def _fresh_run_dir(path: Path, resume: str) -> Path:
    """Never overwrite an earlier run: if ``path`` holds one and we are not resuming, use path-2, -3..."""
    if resume or not path.exists() or not any(path.iterdir()):
        return path
    n = 2
    while (candidate := path.with_name(f"{path.name}-{n}")).exists():
        n += 1
    print(f"{path} holds an earlier run; this run writes to {candidate} "
          f"(to continue that run instead, pass train.resume=auto)")
    return candidate


def _check_offload_device(recipe: Recipe, device: torch.device) -> None:
    if recipe.train.offload_activations and device.type != "cuda":
        raise DeftuneError("train.offload_activations needs a CUDA GPU")


def prepare_model(recipe: Recipe, model: nn.Module, device: torch.device):
    """Attach adapters (lora) or unfreeze the chosen modules (full), then the fast path (model.fast) and
    activation offloading (train.offload_activations). Returns the LoraSpec or None."""
    _check_offload_device(recipe, device)
    spec = _attach_or_unfreeze(recipe, model, device)
    if recipe.model.fast:
        from deftune.kernels.patch import apply_fast_path

        apply_fast_path(model)
    if recipe.data.padding_free:
        _check_padding_free(model)
    if recipe.model.sdpa_backend != "auto":
        from deftune.kernels.sdpa import prefer_sdpa_backend

        print(f"attention: {prefer_sdpa_backend(model, recipe.model.sdpa_backend)} modules try torch's "
              f"{recipe.model.sdpa_backend} SDPA kernel first")
    if recipe.train.offload_activations:
        from deftune.kernels.offload import enable_offloaded_checkpointing
        from deftune.models.arch import num_layers

        t = recipe.train
        wrapped = enable_offloaded_checkpointing(model, device, keep_top=_checked_skip(recipe, num_layers(model)),
                                                 mlp_layers=t.offload_mlp_layers, resident_layers=t.keep_mlp_layers,
                                                 keep_dequantized=t.reuse_dequantized)
        if t.offload_mlp_layers or t.keep_mlp_layers:
            print(f"offloaded checkpointing: {wrapped} layers; MLP gate/up outputs kept instead of recomputed in "
                  f"{t.offload_mlp_layers} (host memory) + {t.keep_mlp_layers} (GPU memory)")
    if recipe.train.mlp_tile_tokens > 0:
        from deftune.kernels.tiled_mlp import tile_mlps

        print(f"MLP tiling: {tile_mlps(model, recipe.train.mlp_tile_tokens)} MLPs run over tiles of "
              f"{recipe.train.mlp_tile_tokens} tokens")
    return spec


def _check_padding_free(model: nn.Module) -> None:
    from deftune.kernels.patch import is_fast
    from deftune.models.patch import pieces

    counts = getattr(model, "_deftune_fast_counts", {}) if is_fast(model) else {}
    if not counts.get("rope") or counts["rope"] != len(pieces(model).attention):
        raise DeftuneError("data.padding_free needs model.fast: true on a Llama, Qwen2, Qwen3 or Mistral model "
                           "(its attention forward is what keeps the examples of a row apart); "
                           f"this model ({getattr(model.config, 'model_type', '?')}) has no such attention")


def enable_checkpointing(recipe: Recipe, model: nn.Module) -> bool:
    """transformers' gradient checkpointing as the recipe asks (``train.gradient_checkpointing``, minus the
    top ``train.checkpoint_skip`` layers). Returns whether it was turned on (off under offloading, which
    checkpoints the layers itself: both would recompute each layer twice)."""
    from deftune.models.arch import decoder_layers

    if not recipe.train.gradient_checkpointing or recipe.train.offload_activations:
        return False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers makes the embedding output require grad here, which drags backward through every
    # layer; non-reentrant checkpointing does not need it, and without it backward stops at the lowest
    # trainable layer.
    model.disable_input_require_grads()
    model.config.use_cache = False
    layers = decoder_layers(model)
    skip = _checked_skip(recipe, len(layers))
    for layer in list(layers)[len(layers) - skip:]:
        # The per-layer switch transformers' GradientCheckpointingLayer reads in training.
        layer.gradient_checkpointing = False
    return True


def _checked_skip(recipe: Recipe, n_layers: int) -> int:
    skip = recipe.train.checkpoint_skip
    if skip > n_layers:
        raise DeftuneError(f"train.checkpoint_skip={skip}: the model has {n_layers} decoder layers")
    return skip


def _attach_or_unfreeze(recipe: Recipe, model: nn.Module, device: torch.device):
    from deftune.adapters.lora.model import attach_lora, freeze_all
    from deftune.models.arch import select_sites

    if recipe.method in ("esft", "expert-lora"):
        from deftune.adapters import experts

        return experts.prepare(recipe, model, device)
    a = recipe.adapter
    targets, layers = a.targets, a.layers
    if a.stages:
        from deftune.train.stages import stage_targets_union

        # Every stage's adapters exist from the start (so they are saved and resumable); the
        # progressive-unfreezing callback decides which of them train when.
        targets, layers = stage_targets_union(a.stages, a.layers, model)
    if recipe.method == "lora":
        from deftune.adapters.dynamic_rank import initial_rank

        # Dynamic rank starts every module at the largest candidate and shrinks it during training.
        spec = attach_lora(model, targets, layers, initial_rank(a), a.alpha, a.dropout, a.rslora)
        model.to(device)
        return spec
    freeze_all(model)
    try:
        sites = select_sites(model, targets, layers)
    except ValueError as exc:
        raise DeftuneError(f"adapter.targets/adapter.layers: {exc}") from exc
    for site in sites:
        for param in model.get_submodule(site.name).parameters():
            # bf16 weights cannot absorb small AdamW updates: train float32 master copies on GPU.
            param.data = param.data.float()
            param.requires_grad_(True)
    return None


def training_callbacks(recipe: Recipe, model: nn.Module) -> list:
    """The methods that act during training, in hook order: unfreezing decides what is trainable, masks
    restrict it further, dynamic rank resizes what trains."""
    from deftune.adapters import dynamic_rank, masks
    from deftune.train import stages

    found = [stages.from_recipe(recipe, model), masks.from_recipe(recipe, model),
             dynamic_rank.from_recipe(recipe, model)]
    return [cb for cb in found if cb is not None]


def count_params(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)``; total includes weights held as 4-bit codes (QLoRA), which are buffers."""
    from deftune.models.quantize import quantized_weight_count

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters()) + quantized_weight_count(model)
    return trainable, total


def train(recipe: str | Path | Recipe | None = None, overrides: list[str] | tuple = (),
          progress: bool = True) -> RunSummary:
    """Run a recipe end to end: load, prepare data, score before, train, save, score after."""
    from deftune.adapters.peft_format import save_adapter
    from deftune.data import prepare_data
    from deftune.data.tokenize import ensure_pad_token
    from deftune.models.load import load_model
    from deftune.train.dist import is_main_process, wrap_model
    from deftune.train.loop import Trainer

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    device = resolve_device(recipe.device)
    _check_offload_device(recipe, device)  # before loading anything
    run_dir = _fresh_run_dir(Path(recipe.output_dir), recipe.train.resume)
    recipe.output_dir = str(run_dir)
    seed_everything(recipe.train.seed)

    t0 = time.perf_counter()
    model, tokenizer, source = load_model(recipe.model, device)
    pad_note = ensure_pad_token(tokenizer)
    if pad_note:
        print(pad_note)
    print(f"Model {source.name} ({type(model).__name__}, {count_params(model)[1]/1e6:.1f}M "
          f"params) on {device} in {time.perf_counter() - t0:.1f}s")
    data = prepare_data(recipe.data, tokenizer)
    for split, stats in data.stats.items():
        print(f"Data {split}: {stats.summary()}")

    from deftune.eval.validate import validation_metrics

    final_n = recipe.eval.final_samples or recipe.eval.samples
    before, _ = validation_metrics(model, tokenizer, data.eval, data.eval_samples, recipe, device, final_n)
    if before:
        print(f"Before training: {_fmt(before)}")

    seed_everything(recipe.train.seed)
    spec = prepare_model(recipe, model, device)
    checkpointing = enable_checkpointing(recipe, model)
    trainable, total = count_params(model)
    print(f"Method {recipe.method}: {trainable:,} trainable of {total:,} parameters "
          f"({100 * trainable / total:.2f}%)")
    model = wrap_model(model)
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
    def save_result(folder: Path) -> Path:
        """What the method trained: a PEFT adapter (lora), an ESFT patch / expert adapter, or the model."""
        if recipe.method == "lora":
            save_adapter(model, spec, folder, source.name)
        elif recipe.method in ("esft", "expert-lora"):
            from deftune.adapters import experts

            experts.save_result(model, spec, folder, source.name)
        else:
            model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        return folder

    def save_best(folder: Path) -> None:
        # The best result (by eval.plateau_metric) is kept apart from the latest.
        save_result(folder)

    trainer = Trainer(recipe, model, tokenizer, data, run_dir, device, progress=progress, on_best=save_best,
                      callbacks=training_callbacks(recipe, model))
    if before:
        trainer._log({"step": 0, "phase": "before", **before})
    result = trainer.run()
    for cb in trainer.callbacks:
        if cb.name == "dynamic_rank":
            from deftune.adapters.dynamic_rank import format_ranks

            print("LoRA ranks per module (0 = dropped):\n" + format_ranks(cb.final_ranks()))
    final_trainable, _ = count_params(model)

    # lora -> adapter/, full -> model/, esft -> esft/ (sparse patch), expert-lora -> expert-lora/.
    out = save_result(run_dir / {"lora": "adapter", "full": "model"}.get(recipe.method, recipe.method))
    if checkpointing:
        model.gradient_checkpointing_disable()
        model.config.use_cache = True
    after, examples = validation_metrics(model, tokenizer, data.eval, data.eval_samples, recipe, device, final_n)
    if after:
        trainer._log({"step": result.steps, "phase": "after", **after})
    summary = RunSummary(
        run_dir=str(run_dir), method=recipe.method, steps=result.steps, seconds=round(result.seconds, 1),
        tokens_per_s=round(result.tokens_per_s, 1), trainable_params=trainable, total_params=total,
        before=before, after=after, examples=examples[: recipe.eval.show_examples], output=str(out),
        skipped_steps=result.skipped_steps, final_trainable_params=final_trainable,
    )
    if is_main_process():
        (run_dir / "summary.json").write_text(json.dumps(summary.__dict__, indent=2), encoding="utf-8")
        if recipe.monitor.report:
            from deftune.train.report import build_report

            summary.report = str(build_report(run_dir, recipe.monitor.ineffective_fraction))
    return summary


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in metrics.items())


def print_summary(summary: RunSummary) -> None:
    print()
    print(f"Run folder: {summary.run_dir}  ({summary.steps} steps in {summary.seconds}s, "
          f"{summary.tokens_per_s} tokens/s)")
    keys = [k for k in ("eval_loss", "eval_ppl", "exact_match", "token_f1", "bleu4", "rougeL")
            if k in summary.before or k in summary.after]
    if keys:
        print(f"{'held-out':<14}{'before':>12}{'after':>12}")
        for key in keys:
            b, a = summary.before.get(key, ""), summary.after.get(key, "")
            if key in ("exact_match", "token_f1", "rougeL"):
                b, a = f"{100 * b:.1f}%" if b != "" else "", f"{100 * a:.1f}%" if a != "" else ""
            print(f"{key:<14}{b!s:>12}{a!s:>12}")
    for ex in summary.examples:
        mark = "ok " if ex["prediction"].strip() == ex["reference"].strip() else "bad"
        print(f"  [{mark}] {ex['query'][:70]!r}\n        -> {ex['prediction'][:60]!r} (expected {ex['reference']!r})")
    print(f"Saved: {summary.output}")
    if summary.report:
        print(f"Report: {summary.report}  (TensorBoard: tensorboard --logdir {summary.run_dir})")


def load_for_inference(run_or_model: str, device: str = "auto"):
    """``(model, tokenizer, recipe)`` from a run folder (base + its adapter or tuned weights) or from
    anything ``model.path`` accepts (then recipe is the default recipe with that model)."""
    from deftune.adapters.peft_format import load_adapter
    from deftune.data.tokenize import ensure_pad_token
    from deftune.models.load import load_model

    dev = resolve_device(device)
    run = Path(run_or_model)
    if (run / "recipe.yaml").is_file():
        import yaml

        recipe = recipe_from_dict(yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8")))
        if recipe.method == "full":
            if not (run / "model").is_dir():
                raise DeftuneError(f"{run} has no model/ folder: the run did not finish")
            recipe.model.path = str(run / "model")
            model, tokenizer, _ = load_model(recipe.model, dev)
        elif recipe.method in ("esft", "expert-lora"):
            from deftune.adapters.experts import load_result

            if not (run / recipe.method).is_dir():
                raise DeftuneError(f"{run} has no {recipe.method}/ folder: the run did not finish "
                                   f"(resume it with train.resume=auto output_dir={run})")
            model, tokenizer, _ = load_model(recipe.model, dev)
            load_result(model, run / recipe.method)
            model.to(dev)
        else:
            if not (run / "adapter").is_dir():
                raise DeftuneError(f"{run} has no adapter/ folder: the run did not finish "
                                   f"(resume it with train.resume=auto output_dir={run})")
            model, tokenizer, _ = load_model(recipe.model, dev)
            load_adapter(model, run / "adapter")
            model.to(dev)
    else:
        recipe = load_recipe(None, [f"model.path={run_or_model}"])
        model, tokenizer, _ = load_model(recipe.model, dev)
    ensure_pad_token(tokenizer)
    model.eval()
    return model, tokenizer, recipe


def evaluate(run_or_model: str, data: str, device: str = "auto", overrides: list[str] | tuple = ()) -> dict:
    """Eval loss, perplexity and the generation metrics of ``eval.metrics`` on ``data``."""
    from deftune.data import prepare_data

    model, tokenizer, recipe = load_for_inference(run_or_model, device)
    if overrides:
        tree = recipe_to_dict(recipe)
        for text in overrides:
            key, value = parse_override(text)
            _set_dotted(tree, key, value)
        recipe = recipe_from_dict(tree)
    # Every record of `data` is scored: it is read as the eval split.
    recipe.data.train = data
    recipe.data.eval = data
    prepared = prepare_data(recipe.data, tokenizer)
    dev = next(model.parameters()).device
    from deftune.eval.validate import validation_metrics

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
    from deftune.data.templates import prompt_for_generation
    from deftune.eval.generation import generate_texts

    model, tokenizer, recipe = load_for_inference(run_or_model, device)
    text = prompt if raw else prompt_for_generation(prompt, tokenizer, recipe.data.template,
                                                    recipe.data.system_prompt)
    streamer = None
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = generate_texts(model, tokenizer, [text], max_new_tokens, batch_size=1, do_sample=temperature > 0,
                         temperature=temperature or 1.0, top_p=top_p, top_k=top_k, streamer=streamer)
    return out[0]


def merge(run: str, out: str, device: str = "cpu") -> Path:
    """Merge a LoRA, expert-LoRA or ESFT run into its base weights; save a plain Hugging Face folder at ``out``.

    A QLoRA run (``model.quantize=nf4``, Dettmers et al. 2023, arXiv:2305.14314) merges into the
    dequantized base: each 4-bit linear becomes a full-precision nn.Linear (model.dtype) holding

        W_merged = dequant(W) + s B A        (dequant(W) alone where no adapter sits)

    so the merged model computes what was trained, the adapters having learned around the quantization
    error. The folder is an ordinary full-precision checkpoint that loads normally (model.quantize=none);
    as is usual with QLoRA, the merge is shipped in 16/32 bits, not 4.
    """
    from deftune.adapters.lora.model import merge_lora

    model, tokenizer, recipe = load_for_inference(run, device)
    if recipe.method == "full":
        raise DeftuneError(f"{run} is a {recipe.method} run: its model/ folder is already a plain model")
    merged = merge_lora(model) if recipe.method != "esft" else 0
    if recipe.method in ("esft", "expert-lora"):
        from deftune.adapters.experts import unwrap_experts

        # ESFT's patch was written into the base weights on load; expert-LoRA folds s*B_e A_e in here.
        merged += unwrap_experts(model, merge=True) + (recipe.method == "esft")
    if merged == 0:
        raise DeftuneError(f"{run}: no LoRA modules to merge")
    from deftune.models.quantize import dequantize_model

    dequantize_model(model)  # 4-bit layers without an adapter: plain dequant(W), so nothing 4-bit is saved
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_path, safe_serialization=True)
    tokenizer.save_pretrained(out_path)
    return out_path


__all__ = ["train", "evaluate", "generate", "merge", "load_for_inference", "RunSummary", "print_summary"]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
