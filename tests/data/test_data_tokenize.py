"""Templates and tokenization: exact response-only labels, EOS, BOS, truncation, skipping, pad fallback."""

from __future__ import annotations

import pytest

from deftune.data import (
    SEED_TEMPLATE,
    Sample,
    encode_prompt,
    ensure_pad_token,
    prompt_for_generation,
    render,
    tokenize_samples,
)
from deftune.data.tokenize import IGNORE_INDEX
from deftune.errors import DeftuneError


def single(query="Give the ISO date for: 1 August 1956", response="1956-08-01", system=None):
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
    return Sample(messages, "t.jsonl:1")


MULTI = Sample(
    [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "what is the answer?"},
        {"role": "assistant", "content": "42"},
    ],
    "chat.jsonl:1",
)


def label_text(tokenizer, example):
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


def test_seed_template_render():
    assert render(single("q", "r"), None, "seed") == [("### Instruction:\nq\n### Response:\n", "r")]
    assert SEED_TEMPLATE.format(query="q") == "### Instruction:\nq\n### Response:\n"


def test_custom_template_with_system_and_braces():
    sample = single("q", "r", system="sys")
    assert render(sample, None, "[{system}] Q: {query} {json} A: ") == [("[sys] Q: q {json} A: ", "r")]
    assert render(single("q", "r"), None, "[{system}] {query}", system_prompt="dflt") == [("[dflt] q", "r")]


def test_multi_turn_under_single_turn_template_suggests_chat():
    with pytest.raises(DeftuneError, match="template=chat"):
        render(MULTI, None, "seed")


def test_seed_labels_mask_prompt_exactly(tiny_tokenizer):
    tok = tiny_tokenizer
    sample = single()
    (example,), stats = tokenize_samples([sample], tok, "seed", max_length=256)
    prompt_ids = tok.encode(SEED_TEMPLATE.format(query=sample.query), add_special_tokens=False)
    response_ids = tok.encode(sample.response, add_special_tokens=False)
    # BOS (the tokenizer's encode adds one) + prompt, then response + EOS.
    assert example.input_ids == [tok.bos_token_id, *prompt_ids, *response_ids, tok.eos_token_id]
    n_prompt = 1 + len(prompt_ids)
    assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example.labels[n_prompt:] == [*response_ids, tok.eos_token_id]
    assert label_text(tok, example) == "1956-08-01</s>"
    assert stats.examples == 1 and stats.tokens == len(example.input_ids)
    assert stats.label_tokens == len(response_ids) + 1
    assert "1 records -> 1 examples" in stats.summary()


def test_no_bos_when_tokenizer_adds_none(tiny_tokenizer_factory):
    tok = tiny_tokenizer_factory(adds_bos=False)
    (example,), _ = tokenize_samples([single()], tok, "seed", max_length=256)
    assert example.input_ids[0] != tok.bos_token_id


def test_chat_multi_turn_labels_cover_every_assistant_turn(tiny_tokenizer):
    tok = tiny_tokenizer
    segments = render(MULTI, tok, "chat")
    assert segments == [
        ("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", "hi there<|im_end|>\n"),
        ("<|im_start|>user\nwhat is the answer?<|im_end|>\n<|im_start|>assistant\n", "42<|im_end|>\n"),
    ]
    (example,), _ = tokenize_samples([MULTI], tok, "chat", max_length=256)
    assert tok.decode(example.input_ids) == "".join(p + r for p, r in segments) + "</s>"
    trained = [
        tok.decode([t for t, lab in zip(example.input_ids[a:b], example.labels[a:b]) if lab != IGNORE_INDEX])
        for a, b in _runs(example.labels)
    ]
    # Both answers (with their end-of-turn token) are trained on, neither user turn is.
    assert trained == ["hi there<|im_end|>\n", "42<|im_end|>\n"]
    # No BOS for chat templates and EOS appended as the template's turn end is not the tokenizer's EOS.
    assert example.input_ids[0] != tok.bos_token_id and example.input_ids[-1] == tok.eos_token_id


def _runs(labels):
    """[start, end) spans of consecutive trained labels, EOS run excluded (it stands alone at the end)."""
    spans, start = [], None
    for i, lab in enumerate([*labels[:-1], IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = i
        elif lab == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_chat_eos_not_doubled_when_template_ends_with_it(tiny_tokenizer_factory):
    tok = tiny_tokenizer_factory()
    tok.eos_token = "<|im_end|>"
    (example,), _ = tokenize_samples([single("q", "r")], tok, "chat", max_length=256)
    assert example.input_ids.count(tok.eos_token_id) == 2  # user turn end + assistant turn end
    assert label_text(tok, example) == "r<|im_end|>\n"


def test_chat_system_prompt_added_when_sample_has_none(tiny_tokenizer):
    ((prompt, _),) = render(single("q", "r"), tiny_tokenizer, "chat", system_prompt="S")
    assert prompt.startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq")


def test_chat_without_template_is_an_error(tiny_tokenizer_factory):
    tok = tiny_tokenizer_factory(chat_template=False)
    with pytest.raises(DeftuneError, match="no(ne| chat template)"):
        tokenize_samples([single()], tok, "chat", max_length=64)


def test_non_prefix_consistent_chat_template_is_an_error(tiny_tokenizer):
    # A template that drops earlier assistant turns (like reasoning-stripping templates) breaks prefixes.
    tiny_tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(DeftuneError, match="not prefix-consistent"):
        render(MULTI, tiny_tokenizer, "chat")


def test_prompt_for_generation_matches_training_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    for template in ("seed", "Q: {query}\nA:", "chat"):
        sample = single()
        (example,), _ = tokenize_samples([sample], tok, template, max_length=256)
        n_prompt = example.labels.index(next(t for t in example.labels if t != IGNORE_INDEX))
        assert encode_prompt(sample, tok, template) == example.input_ids[:n_prompt]
        assert encode_prompt(sample.query, tok, template) == example.input_ids[:n_prompt]
    assert prompt_for_generation(MULTI, tok, "chat").endswith(
        "what is the answer?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt_for_generation("q", tok, "seed") == "### Instruction:\nq\n### Response:\n"


def test_truncation_cuts_response_and_counts(tiny_tokenizer):
    tok = tiny_tokenizer
    long = single(response="the quick brown fox jumps over the lazy dog " * 5)
    (full,), _ = tokenize_samples([long], tok, "seed", max_length=1024)
    examples, stats = tokenize_samples([long, single()], tok, "seed", max_length=len(full.input_ids) - 5)
    assert stats.truncated == 1 and stats.examples == 2
    assert examples[0].input_ids == full.input_ids[: len(full.input_ids) - 5]
    assert examples[0].labels == full.labels[: len(full.input_ids) - 5]
    assert "1 truncated" in stats.summary()


def test_prompt_too_long_skipped_and_all_skipped_error(tiny_tokenizer):
    tok = tiny_tokenizer
    short, long = single(query="hi"), single(query="the quick brown fox jumps over the lazy dog " * 8)
    (short_ex,), _ = tokenize_samples([short], tok, "seed", max_length=1024)
    short_prompt = short_ex.labels.count(IGNORE_INDEX)
    examples, stats = tokenize_samples([long, short], tok, "seed", max_length=short_prompt + 1)
    assert [e.source for e in examples] == [short.source]
    assert stats.skipped_prompt_too_long == 1 and stats.truncated == 1
    assert "1 skipped" in stats.summary()
    with pytest.raises(DeftuneError, match=rf"max_length={short_prompt}.*shortest prompt has {short_prompt}"):
        tokenize_samples([long, short], tok, "seed", max_length=short_prompt)


def test_empty_response_is_skipped_and_counted(tiny_tokenizer):
    empty, blank, good = single(response=""), single(response="  \n"), single()
    empty.source, blank.source, good.source = "t.jsonl:1", "t.jsonl:2", "t.jsonl:3"
    empty_turn = Sample([*MULTI.messages[:1], {"role": "assistant", "content": ""}, *MULTI.messages[2:]],
                        "chat.jsonl:1")
    for template, samples in (("seed", [empty, blank, good]), ("chat", [empty, empty_turn, good])):
        examples, stats = tokenize_samples(samples, tiny_tokenizer, template, max_length=256)
        assert [e.source for e in examples] == ["t.jsonl:3"]
        assert stats.skipped_empty_response == 2 and stats.examples == 1 and stats.records == 3
        assert "2 skipped (empty response)" in stats.summary()
    with pytest.raises(DeftuneError, match="empty response.*t.jsonl:1"):
        tokenize_samples([empty, blank], tiny_tokenizer, "seed", max_length=256)


def test_pad_falls_back_to_eos(tiny_tokenizer_no_pad, tiny_tokenizer):
    note = ensure_pad_token(tiny_tokenizer_no_pad)
    assert tiny_tokenizer_no_pad.pad_token == "</s>" and "</s>" in note
    assert tiny_tokenizer_no_pad.pad_token_id == tiny_tokenizer_no_pad.eos_token_id
    assert ensure_pad_token(tiny_tokenizer) is None and tiny_tokenizer.pad_token == "<pad>"


def test_pad_without_eos_is_an_error(tiny_tokenizer_no_pad):
    tiny_tokenizer_no_pad.eos_token = None
    with pytest.raises(DeftuneError, match="neither a pad token nor an EOS"):
        ensure_pad_token(tiny_tokenizer_no_pad)
