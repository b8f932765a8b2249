"""Template augmentation: how many examples are re-rendered, with which phrasing, and reproducibly."""

from __future__ import annotations

import json

import pytest

from deftune.config import DataConfig
from deftune.data import (
    CHAT_WRAPPER_POOL,
    SEED_TEMPLATE,
    SEED_TEMPLATE_POOL,
    PreparedData,
    Sample,
    augment_examples,
    epoch_examples,
    example_sample_index,
    prepare_data,
    template_pool,
    tokenize_samples,
)
from deftune.data.tokenize import IGNORE_INDEX
from deftune.errors import DeftuneError

N = 30
WORDS = "the quick brown fox jumps over lazy dog hello world answer question".split()


def make_samples(n=N, system=None):
    samples = []
    for i in range(n):
        query = f"copy: {WORDS[i % len(WORDS)]} {WORDS[(3 * i + 1) % len(WORDS)]} {i}"
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": f"answer {i}"}]
        samples.append(Sample(messages, f"t.jsonl:{i + 1}"))
    return samples


def prepared(tokenizer, template, max_length=256, system_prompt="", samples=None):
    samples = samples if samples is not None else make_samples()
    examples, _ = tokenize_samples(samples, tokenizer, template, max_length, system_prompt)
    return samples, examples


def augment(samples, examples, tokenizer, template, fraction=0.1, seed=0, epoch=0, max_length=256, **kw):
    return augment_examples(samples, examples, tokenizer, template, fraction, seed, epoch, max_length, **kw)


def changed(before, after):
    return [i for i, (a, b) in enumerate(zip(before, after)) if a.input_ids != b.input_ids]


def label_text(tokenizer, example):
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


def test_seed_template_replaces_round_fraction_with_other_phrasings(tiny_tokenizer):
    tok = tiny_tokenizer
    samples, examples = prepared(tok, "seed")
    out, count = augment(samples, examples, tok, "seed")
    assert count == round(0.1 * N) == 3
    assert len(out) == len(examples)
    moved = changed(examples, out)
    assert len(moved) == count
    alternatives = [t for t in SEED_TEMPLATE_POOL if t != SEED_TEMPLATE]
    for i, (before, after) in enumerate(zip(examples, out)):
        if i not in moved:
            assert after is before
            continue
        sample = samples[i]
        texts = [f"<s>{t.replace('{query}', sample.query)}{sample.response}</s>" for t in alternatives]
        assert tok.decode(after.input_ids) in texts
        # Response-only labels: the same response + EOS, everything before it masked.
        assert label_text(tok, after) == label_text(tok, before) == f"{sample.response}</s>"
        n_labels = sum(label != IGNORE_INDEX for label in after.labels)
        assert all(label == IGNORE_INDEX for label in after.labels[:-n_labels])
        assert after.source == before.source


def test_replaced_example_matches_plain_tokenization_with_that_template(tiny_tokenizer):
    tok = tiny_tokenizer
    samples, examples = prepared(tok, "seed")
    out, _ = augment(samples, examples, tok, "seed", fraction=1.0)
    for sample, example in zip(samples, out):
        matches = [tokenize_samples([sample], tok, t, 256)[0][0] for t in SEED_TEMPLATE_POOL[1:]]
        assert any(example == m for m in matches)


def test_chat_template_wraps_only_the_last_user_text(tiny_tokenizer):
    tok = tiny_tokenizer
    samples, examples = prepared(tok, "chat", system_prompt="be brief")
    out, count = augment(samples, examples, tok, "chat", system_prompt="be brief")
    assert count == 3
    moved = changed(examples, out)
    assert len(moved) == count
    for i in moved:
        sample = samples[i]
        text = tok.decode(out[i].input_ids)
        # Chat markup and the system turn intact; only the user's text is rephrased.
        assert text.startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n")
        assert text.endswith(f"<|im_start|>assistant\n{sample.response}<|im_end|>\n</s>")
        user = text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
        assert user != sample.query
        assert user in [w.replace("{query}", sample.query) for w in CHAT_WRAPPER_POOL if w != "{query}"]
        assert label_text(tok, out[i]) == label_text(tok, examples[i])
        assert label_text(tok, out[i]) == f"{sample.response}<|im_end|>\n</s>"


def test_chat_multi_turn_wraps_last_user_message_only(tiny_tokenizer):
    tok = tiny_tokenizer
    sample = Sample(
        [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi there"},
            {"role": "user", "content": "what is the answer?"},
            {"role": "assistant", "content": "42"},
        ],
        "chat.jsonl:1",
    )
    samples, examples = prepared(tok, "chat", samples=[sample])
    out, count = augment(samples, examples, tok, "chat", fraction=1.0)
    assert count == 1
    text = tok.decode(out[0].input_ids)
    assert text.startswith("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nhi there<|im_end|>\n")
    assert "<|im_start|>user\nwhat is the answer?<|im_end|>" not in text
    assert label_text(tok, out[0]) == label_text(tok, examples[0])


def test_same_seed_and_epoch_reproduce_other_epochs_differ(tiny_tokenizer):
    tok = tiny_tokenizer
    samples, examples = prepared(tok, "seed")
    first, _ = augment(samples, examples, tok, "seed", seed=3, epoch=1)
    again, _ = augment(samples, examples, tok, "seed", seed=3, epoch=1)
    assert first == again
    other_epoch, _ = augment(samples, examples, tok, "seed", seed=3, epoch=2)
    other_seed, _ = augment(samples, examples, tok, "seed", seed=4, epoch=1)
    assert changed(examples, first) != changed(examples, other_epoch)
    assert changed(examples, first) != changed(examples, other_seed)


def test_fraction_zero_returns_the_input(tiny_tokenizer):
    samples, examples = prepared(tiny_tokenizer, "seed")
    out, count = augment(samples, examples, tiny_tokenizer, "seed", fraction=0.0)
    assert out is examples and count == 0


@pytest.mark.parametrize("template", ["seed", "Q: {query}\nA: ", "chat"])
def test_current_template_is_never_drawn(tiny_tokenizer, template):
    tok = tiny_tokenizer
    samples, examples = prepared(tok, template)
    assert len(template_pool(template)) == (
        len(CHAT_WRAPPER_POOL) - 1 if template == "chat" else len(SEED_TEMPLATE_POOL) - 1
    )
    for epoch in range(3):
        out, count = augment(samples, examples, tok, template, fraction=1.0, epoch=epoch)
        assert count == N
        assert all(a.input_ids != b.input_ids for a, b in zip(examples, out))


def test_custom_template_keeps_its_system_text(tiny_tokenizer):
    tok = tiny_tokenizer
    template = "[{system}] {query} => "
    samples, examples = prepared(tok, template, samples=make_samples(4, system="sys"))
    out, count = augment(samples, examples, tok, template, fraction=1.0)
    assert count == 4
    assert all(tok.decode(ex.input_ids).startswith("<s>sys\n\n") for ex in out)


def test_rerendering_too_long_for_max_length_keeps_the_original(tiny_tokenizer):
    tok = tiny_tokenizer
    template = "Q: {query}\nA: "
    samples = make_samples()
    longest_prompt = max(len(tok.encode(template.replace("{query}", s.query))) for s in samples)
    max_length = longest_prompt + 4
    samples, examples = prepared(tok, template, max_length=max_length, samples=samples)
    assert len(examples) == N
    out, count = augment(samples, examples, tok, template, fraction=1.0, max_length=max_length)
    kept = [i for i in range(N) if out[i] is examples[i]]
    assert kept, "the long Alpaca-style preamble cannot fit, so some re-renderings are skipped"
    assert count == N - len(kept) > 0
    assert all(len(ex) <= max_length for ex in out)


def test_fraction_out_of_range_and_misaligned_inputs_are_errors(tiny_tokenizer):
    samples, examples = prepared(tiny_tokenizer, "seed")
    with pytest.raises(DeftuneError, match=r"\[0, 1\]"):
        augment(samples, examples, tiny_tokenizer, "seed", fraction=1.5)
    with pytest.raises(DeftuneError, match="one sample per example"):
        augment(samples[1:], examples, tiny_tokenizer, "seed")


def test_prepare_data_maps_examples_to_samples_past_skipped_ones(tmp_path, tiny_tokenizer):
    path = tmp_path / "t.jsonl"
    rows = [{"query": f"copy: hello {i}", "response": f"hello {i}"} for i in range(20)]
    rows[4]["query"] = "the quick brown fox " * 40  # prompt longer than max_length: skipped
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train=str(path), eval=str(path), max_length=48, augment_fraction=0.25)
    data = prepare_data(cfg, tiny_tokenizer)
    assert data.stats["train"].skipped_prompt_too_long == 1
    assert data.train_sample_index == [i for i in range(20) if i != 4]
    assert [data.train_samples[j].source for j in data.train_sample_index] == [e.source for e in data.train]

    out, count = epoch_examples(data, tiny_tokenizer, cfg, seed=0, epoch=0)
    assert count == round(0.25 * 19)
    for ex_index in changed(data.train, out):
        sample = data.train_samples[data.train_sample_index[ex_index]]
        assert sample.query in tiny_tokenizer.decode(out[ex_index].input_ids)
        assert label_text(tiny_tokenizer, out[ex_index]) == f"{sample.response}</s>"
    assert epoch_examples(data, tiny_tokenizer, cfg, seed=0, epoch=0, fraction=0.0) == (data.train, 0)

    # A PreparedData built without the index is matched by source.
    bare = PreparedData(data.train, data.eval, data.train_samples, data.eval_samples)
    assert epoch_examples(bare, tiny_tokenizer, cfg, seed=0, epoch=0) == (out, count)
    assert example_sample_index(data.train_samples, data.train) == data.train_sample_index
