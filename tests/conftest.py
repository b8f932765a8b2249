"""Shared test fixtures: tiny in-code tokenizers (no downloads)."""

from __future__ import annotations

import functools

import pytest

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
