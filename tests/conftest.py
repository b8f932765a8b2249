"""Shared test fixtures: tiny in-code tokenizers (no downloads)."""

from __future__ import annotations

import functools
import os

import pytest
import torch

# Without a GPU the Triton kernels (deftune.kernels, NF4 dequantization) are tested through Triton's CPU
# interpreter. Triton reads TRITON_INTERPRET when a kernel is defined; deftune defines its kernels lazily
# on first use, so setting it here, when the test session starts, is early enough.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


@functools.lru_cache(maxsize=1)
def _tiny_backend_json() -> str:
    """A byte-level BPE (any text encodes) trained on a few sentences; its post-processor adds BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "### Instruction:\nGive the ISO date (YYYY-MM-DD) for: 1 August 1956\n### Response:\n1956-08-01",
        "Rewrite the date in YYYY-MM-DD format: 16 November 1985",
        "the quick brown fox jumps over the lazy dog. hello world, what is the answer?",
        "system user assistant question answer instruction input output response query",
    ]
    tok.train_from_iterator(corpus * 5, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok.to_str()


def make_tiny_tokenizer(pad: bool = True, chat_template: bool = True, adds_bos: bool = True):
    """A fresh ``PreTrainedTokenizerFast`` (Llama-like: encode adds ``<s>``; EOS ``</s>``; ChatML chat).

    ``pad=False`` leaves ``pad_token`` unset; ``adds_bos=False`` drops the BOS post-processor (GPT-2
    style); ``chat_template=False`` makes a "base model" tokenizer without a chat template.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_tiny_backend_json())
    if not adds_bos:
        backend.post_processor = None
    kwargs = {"bos_token": "<s>", "eos_token": "</s>"}
    if pad:
        kwargs["pad_token"] = "<pad>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    if chat_template:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny
    matmuls gain nothing from threads, and on a busy 2-core machine spinning OpenMP workers slow them."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_tokenizer():
    """Byte-level BPE tokenizer with BOS/EOS/pad and a ChatML chat template."""
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_tokenizer_no_pad():
    """Like ``tiny_tokenizer`` but with no pad token."""
    return make_tiny_tokenizer(pad=False)


@pytest.fixture
def tiny_tokenizer_factory():
    """``make_tiny_tokenizer`` itself, for tests that need a variant (no BOS, no chat template...)."""
    return make_tiny_tokenizer


def save_tiny_llama(folder, seed: int = 0, layers: int = 2):
    """Save a seeded tiny LlamaForCausalLM + the tiny tokenizer as a safetensors model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def write_copy_task(path, n: int = 48, seed: int = 0):
    """A learnable toy task: the response repeats the last words of the query."""
    import json
    import random

    rng = random.Random(seed)
    words = "the quick brown fox jumps over lazy dog hello world answer question".split()
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            picked = " ".join(rng.choice(words) for _ in range(3))
            fh.write(json.dumps({"query": f"copy: {picked}", "response": picked}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def copy_task_file(tmp_path_factory):
    return write_copy_task(tmp_path_factory.mktemp("data") / "copy.jsonl")


def tiny_recipe(model_dir, data_file, output_dir, **sections):
    """A Recipe for the tiny model: small batches, no generation scoring; ``sections`` override keys,
    e.g. ``train={"max_steps": 4}``."""
    from deftune.config import recipe_from_dict

    tree = {
        "method": "lora",
        "output_dir": str(output_dir),
        "device": "cpu",
        "model": {"path": str(model_dir)},
        "data": {"train": str(data_file), "max_length": 64, "eval_fraction": 0.2},
        "adapter": {"targets": "all-linear", "rank": 4, "alpha": 8},
        "train": {"lr": 5e-3, "micro_batch": 4, "grad_accum": 2, "max_steps": 6, "warmup": 1},
        "eval": {"samples": 0},
        "monitor": {"tensorboard": False, "report": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            tree.setdefault(section, {}).update(values)
        else:
            tree[section] = values
    return recipe_from_dict(tree)


def wire_trainer(monkeypatch, *extra):
    """Make api.train build a Trainer that also runs the test probes ``extra`` (callbacks; a probe's
    optional ``on_trainer_init(trainer)`` runs once the trainer exists). Setting ``stop_at`` on the returned
    class sends SIGTERM after that step, as a crash-and-resume test needs."""
    import signal

    from deftune.training import loop

    class WiredTrainer(loop.Trainer):
        stop_at = None

        def __init__(self, *args, callbacks=(), **kwargs):
            super().__init__(*args, callbacks=[*callbacks, *extra], **kwargs)
            for cb in extra:
                getattr(cb, "on_trainer_init", lambda trainer: None)(self)

        def train_step(self):
            out = super().train_step()
            if self.step == self.stop_at:
                self._stop_signal = signal.SIGTERM
            return out

    monkeypatch.setattr(loop, "Trainer", WiredTrainer)
    return WiredTrainer
