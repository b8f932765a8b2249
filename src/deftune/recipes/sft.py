"""The training job: ``deftune train RECIPE``.

Life cycle: set up (read and check the recipe, load model and data, score the base model, attach the
method, the fast path and checkpointing) -> train (the Trainer with the recipe's callbacks) -> save (the
method's result, the summary, the report) -> clean up (checkpointing off, score the tuned model).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from deftune.adapters.dynamic_rank import format_ranks
from deftune.adapters.methods import check_recipe, get_method
from deftune.config import Recipe, load_recipe, recipe_from_dict, recipe_to_dict, save_recipe
from deftune.data import prepare_data, read_samples
from deftune.data.tokenize import ensure_pad_token
from deftune.errors import DeftuneError
from deftune.eval.validate import validation_metrics
from deftune.fast_path.offload import enable_offloaded_checkpointing
from deftune.fast_path.patch import apply_fast_path, fast_counts
from deftune.fast_path.sdpa import prefer_sdpa_backend
from deftune.fast_path.tiled_mlp import tile_mlps
from deftune.models.arch import decoder_layers, num_layers
from deftune.models.load import load_model, resolve_device
from deftune.models.quantize import quantized_weight_count
from deftune.models.surgery import pieces
from deftune.training import loop
from deftune.training.callbacks import dynamic_rank, masks, stages
from deftune.training.checkpoint import find_checkpoint, read_meta, resume_differences, write_folder
from deftune.training.dist import is_main_process, wrap_model
from deftune.training.report import build_report


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


def check_output_dir(output_dir: str) -> Path:
    """The run folder the recipe names, refused when it cannot be one: empty, the file system root, or an
    existing file. (Whether it can be written is ``probe_run_dir``'s to find out.)"""
    if not output_dir.strip():
        raise DeftuneError("output_dir is empty: set it to the run folder, e.g. output_dir=runs/my-run")
    path = Path(output_dir).expanduser()
    resolved = path.resolve()
    if resolved == Path(resolved.anchor):
        raise DeftuneError(f"output_dir={output_dir} is the root of the file system; give the run a folder "
                           "of its own, e.g. output_dir=runs/my-run")
    if path.exists() and not path.is_dir():
        raise DeftuneError(f"output_dir={output_dir} is an existing file, not a folder; choose another path")
    return path


def probe_run_dir(path: Path) -> None:
    """Create ``path`` and write a probe file into it, so an unwritable run folder fails before the model
    loads; then remove the probe and the folders made for it, so a run that fails before it starts
    training leaves no folder behind."""
    made = [p for p in (path, *path.parents) if not p.exists()]
    probe = path / f".deftune-write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"deftune")
        probe.unlink()
    except OSError as exc:
        raise DeftuneError(f"output_dir={path}: cannot write the run folder there "
                           f"({exc.strerror or exc}); choose a writable path") from None
    finally:
        for folder in made:  # deepest first; rmdir leaves anything another process put there
            try:
                folder.rmdir()
            except OSError:
                break


def _set_up_record(record: dict) -> bool:
    """A metrics.jsonl record written before the first step: the scores before training (step 0), or the
    augmentation event logged as the first epoch begins."""
    return record.get("step", 0) == 0 or (record.get("event") == "augmented" and record.get("epoch", 0) == 0)


def _unstarted(path: Path) -> bool:
    """True when ``path`` holds only what a start that failed before its first step writes: this run
    folder's recipe.yaml, set-up records in metrics.jsonl and TensorBoard's first event files."""
    recipe_file = path / "recipe.yaml"
    try:
        tree = yaml.safe_load(recipe_file.read_text(encoding="utf-8"))
        if not isinstance(tree, dict) or Path(str(tree.get("output_dir", ""))).resolve() != path.resolve():
            return False
        for entry in path.iterdir():
            if entry.name == "metrics.jsonl":
                lines = entry.read_text(encoding="utf-8").splitlines()
                if not all(_set_up_record(json.loads(line)) for line in lines if line.strip()):
                    return False
            elif entry.name != "recipe.yaml" and not (entry.is_file() and entry.name.startswith("events.out.")):
                return False
    except (OSError, ValueError, yaml.YAMLError, AttributeError):
        return False
    return True


def fresh_run_dir(path: Path, resume: str) -> Path:
    """Never overwrite an earlier run: if ``path`` holds one and we are not resuming, use path-2, -3...

    A folder holding only what a start that failed before its first step wrote (``_unstarted``) holds no
    run: its files are removed and the folder reused.
    """
    try:
        if not path.exists() or not any(path.iterdir()):
            return path
    except OSError as exc:
        raise DeftuneError(f"output_dir={path}: cannot read the folder ({exc.strerror or exc})") from None
    if _unstarted(path):
        for entry in path.iterdir():
            entry.unlink()
        print(f"{path} holds only a start that failed before its first step; this run reuses it")
        return path
    if resume:
        return path
    n = 2
    while (candidate := path.with_name(f"{path.name}-{n}")).exists():
        n += 1
    print(f"{path} holds an earlier run; this run writes to {candidate} "
          f"(to continue that run instead, pass train.resume=auto)")
    return candidate


def check_resume(recipe: Recipe, run_dir: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint ``train.resume`` continues from (None for a fresh start) and the recipe keys changed
    since it was made. A change that alters the run's trajectory (``resume_differences``) is refused,
    with the list of differences, unless ``train.resume_force``."""
    checkpoint = find_checkpoint(run_dir, recipe.train.resume)
    if checkpoint is None:
        return None, []
    saved = read_meta(checkpoint).get("recipe")
    if saved is None:  # a checkpoint from before checkpoints recorded their recipe
        try:
            saved = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return checkpoint, []
    try:
        saved = recipe_to_dict(recipe_from_dict(saved))  # defaults filled in, as in the current recipe
    except (DeftuneError, TypeError, AttributeError):
        pass
    changed = resume_differences(saved, recipe_to_dict(recipe))
    if changed and not recipe.train.resume_force:
        raise DeftuneError(f"Resuming from {checkpoint} with a recipe that changes the run: "
                           f"{'; '.join(changed)}. Resume with the original values, or pass "
                           "train.resume_force=true to accept the changes (the run then no longer repeats "
                           "its record)")
    if changed:
        print(f"train.resume_force: resuming from {checkpoint} with changes: {'; '.join(changed)}")
    return checkpoint, changed


def record_resume(recipe: Recipe, run_dir: Path, checkpoint: Path, changed: list[str]) -> None:
    """``recipe.yaml`` keeps the recipe the run started with; each resume is appended as a comment line
    (YAML readers skip it), with the forced changes if any."""
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        save_recipe(recipe, path)
    note = f"# resumed {time.strftime('%Y-%m-%d %H:%M:%S')} from {checkpoint.name}"
    if changed:
        note += " with train.resume_force, changes: " + "; ".join(changed).replace("\n", " ")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(note + "\n")


def _check_offload_device(recipe: Recipe, device: torch.device) -> None:
    if recipe.train.offload_activations and device.type != "cuda":
        raise DeftuneError("train.offload_activations needs a CUDA GPU")


def prepare_model(recipe: Recipe, model: nn.Module, device: torch.device):
    """Attach the recipe's method (adapters, or trainable weights), then the fast path (model.fast) and
    activation offloading (train.offload_activations). Returns the method's spec for saving."""
    _check_offload_device(recipe, device)
    spec = get_method(recipe.method).attach(recipe, model, device)
    if recipe.model.fast:
        apply_fast_path(model)
    if recipe.data.padding_free:
        _check_padding_free(model)
    if recipe.model.sdpa_backend != "auto":
        print(f"attention: {prefer_sdpa_backend(model, recipe.model.sdpa_backend)} modules try torch's "
              f"{recipe.model.sdpa_backend} SDPA kernel first")
    if recipe.train.offload_activations:
        t = recipe.train
        wrapped = enable_offloaded_checkpointing(model, device, keep_top=_checked_skip(recipe, num_layers(model)),
                                                 mlp_layers=t.offload_mlp_layers, resident_layers=t.keep_mlp_layers,
                                                 keep_dequantized=t.reuse_dequantized)
        if t.offload_mlp_layers or t.keep_mlp_layers:
            print(f"offloaded checkpointing: {wrapped} layers; MLP gate/up outputs kept instead of recomputed in "
                  f"{t.offload_mlp_layers} (host memory) + {t.keep_mlp_layers} (GPU memory)")
    if recipe.train.mlp_tile_tokens > 0:
        print(f"MLP tiling: {tile_mlps(model, recipe.train.mlp_tile_tokens)} MLPs run over tiles of "
              f"{recipe.train.mlp_tile_tokens} tokens")
    return spec


def _check_padding_free(model: nn.Module) -> None:
    rope = fast_counts(model).get("rope")
    if not rope or rope != len(pieces(model).attention):
        raise DeftuneError("data.padding_free needs model.fast: true on a Llama, Qwen2, Qwen3 or Mistral model "
                           "(its attention forward is what keeps the examples of a row apart); "
                           f"this model ({getattr(model.config, 'model_type', '?')}) has no such attention")


def enable_checkpointing(recipe: Recipe, model: nn.Module) -> bool:
    """transformers' gradient checkpointing as the recipe asks (``train.gradient_checkpointing``, minus the
    top ``train.checkpoint_skip`` layers). Returns whether it was turned on (off under offloading, which
    checkpoints the layers itself: both would recompute each layer twice)."""
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


def training_callbacks(recipe: Recipe, model: nn.Module) -> list:
    """The features that act during training, in hook order: unfreezing decides what is trainable, masks
    restrict it further, dynamic rank resizes what trains."""
    found = [stages.from_recipe(recipe, model), masks.from_recipe(recipe, model),
             dynamic_rank.from_recipe(recipe, model)]
    return [cb for cb in found if cb is not None]


def count_params(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)``; total includes weights held as 4-bit codes (QLoRA), which are buffers."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters()) + quantized_weight_count(model)
    return trainable, total


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in metrics.items())


def run(recipe: str | Path | Recipe | None = None, overrides: list[str] | tuple = (),
        progress: bool = True) -> RunSummary:
    """Run a recipe end to end: load, prepare data, score before, train, save, score after."""
    # -- set up ------------------------------------------------------------------------------------
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    check_recipe(recipe)
    method = get_method(recipe.method)
    # Everything that can fail without the model fails here, before the (slow) model load.
    run_dir = fresh_run_dir(check_output_dir(recipe.output_dir), recipe.train.resume)
    probe_run_dir(run_dir)
    recipe.output_dir = str(run_dir)
    samples = read_samples(recipe.data)  # every record read and checked; tokenized once the tokenizer is here
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    device = resolve_device(recipe.device)
    _check_offload_device(recipe, device)
    resume_from, resume_changes = check_resume(recipe, run_dir)  # before the model loads
    loop.seed_everything(recipe.train.seed)

    t0 = time.perf_counter()
    model, tokenizer, source = load_model(recipe.model, device)
    pad_note = ensure_pad_token(tokenizer)
    if pad_note:
        print(pad_note)
    print(f"Model {source.name} ({type(model).__name__}, {count_params(model)[1]/1e6:.1f}M "
          f"params) on {device} in {time.perf_counter() - t0:.1f}s")
    data = prepare_data(recipe.data, tokenizer, samples)
    for split, stats in data.stats.items():
        print(f"Data {split}: {stats.summary()}")

    final_n = recipe.eval.final_samples or recipe.eval.samples
    before, _ = validation_metrics(model, tokenizer, data.eval, data.eval_samples, recipe, device, final_n)
    if before:
        print(f"Before training: {_fmt(before)}")

    loop.seed_everything(recipe.train.seed)
    spec = prepare_model(recipe, model, device)
    checkpointing = enable_checkpointing(recipe, model)
    trainable, total = count_params(model)
    print(f"Method {recipe.method}: {trainable:,} trainable of {total:,} parameters "
          f"({100 * trainable / total:.2f}%)")
    model = wrap_model(model)
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            save_recipe(recipe, run_dir / "recipe.yaml")
        else:
            record_resume(recipe, run_dir, resume_from, resume_changes)

    def save_result(folder: Path) -> Path:
        """What the method trained (a PEFT adapter, an ESFT patch, the model...) and the tokenizer, written
        whole or not at all (a full disk is one message naming the path)."""
        def write(into: Path) -> None:
            method.save(model, spec, into, source.name)
            tokenizer.save_pretrained(into)
        return write_folder(folder, write, trainer.final_checkpoint)

    def periodic_validation(m: nn.Module) -> dict:
        return validation_metrics(m, tokenizer, data.eval, data.eval_samples, recipe, device,
                                  recipe.eval.samples)[0]

    # -- train -------------------------------------------------------------------------------------
    # The best result (by eval.plateau_metric) is kept apart from the latest, in best/.
    trainer = loop.Trainer(recipe, model, tokenizer, data, run_dir, device, progress=progress,
                           on_best=save_result, callbacks=training_callbacks(recipe, model),
                           validator=periodic_validation)
    if before:
        trainer.log({"step": 0, "phase": "before", **before})
    # Signals stay handled to the end of the final evaluation: a signal in training checkpoints and
    # stops; one in the final save or evaluation stops with the checkpoint and the result on disk.
    with trainer.handle_signals():
        # -- train, then save (the final checkpoint and the method's result, before any scoring) ----
        result = trainer.run(resume_from, save_result=lambda: save_result(run_dir / method.output))
        out = trainer.result_path or run_dir / method.output
        for cb in trainer.callbacks:
            if isinstance(cb, dynamic_rank.DynamicRankCallback):
                print("LoRA ranks per module (0 = dropped):\n" + format_ranks(cb.final_ranks()))
        final_trainable, _ = count_params(model)

        # -- clean up and score ----------------------------------------------------------------------
        if checkpointing:
            model.gradient_checkpointing_disable()
            model.config.use_cache = True
        after, examples = validation_metrics(model, tokenizer, data.eval, data.eval_samples, recipe, device,
                                             final_n)
        if after:
            trainer.log({"step": result.steps, "phase": "after", **after})
    summary = RunSummary(
        run_dir=str(run_dir), method=recipe.method, steps=result.steps, seconds=round(result.seconds, 1),
        tokens_per_s=round(result.tokens_per_s, 1), trainable_params=trainable, total_params=total,
        before=before, after=after, examples=examples[: recipe.eval.show_examples], output=str(out),
        skipped_steps=result.skipped_steps, final_trainable_params=final_trainable,
    )
    if is_main_process():
        (run_dir / "summary.json").write_text(json.dumps(summary.__dict__, indent=2), encoding="utf-8")
        if recipe.monitor.report:
            summary.report = str(build_report(run_dir, recipe.monitor.ineffective_fraction))
    return summary
