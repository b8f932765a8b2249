"""Split, padding, packing and epoch batches; packed rows must not leak attention or positions."""

from __future__ import annotations

import pytest
import torch

from deftune.data import (
    Example,
    batches,
    pack_collate,
    pack_examples,
    pad_collate,
    split_train_eval,
    to_samples,
    tokenize_samples,
)
from deftune.data.tokenize import IGNORE_INDEX


def ex(n, start=10, prompt=2, source="x"):
    ids = list(range(start, start + n))
    return Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:], source)


def test_split_is_seeded_disjoint_and_complete():
    items = list(range(50))
    train, evaluation = split_train_eval(items, 0.2, seed=3)
    assert (train, evaluation) == split_train_eval(items, 0.2, seed=3)
    assert len(evaluation) == 10 and sorted(train + evaluation) == items
    assert not set(train) & set(evaluation)
    assert split_train_eval(items, 0.2, seed=4)[1] != evaluation


def test_split_edge_cases():
    assert split_train_eval([1, 2], 0.01, seed=0)[1] != []  # at least one eval item
    assert split_train_eval([1], 0.5, seed=0) == ([1], [])
    assert split_train_eval([1, 2, 3], 0.0, seed=0) == ([1, 2, 3], [])
    train, evaluation = split_train_eval([1, 2, 3], 0.9, seed=0)
    assert len(train) == 1 and len(evaluation) == 2  # never empties the training set


def test_pad_collate_right_pads():
    batch = pad_collate([ex(5), ex(3)], pad_id=0)
    assert batch["input_ids"].tolist()[1] == [10, 11, 12, 0, 0]
    assert batch["labels"].tolist()[1] == [IGNORE_INDEX, IGNORE_INDEX, 12, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]


def test_pack_examples_first_fit_respects_max_length():
    examples = [ex(n, source=str(n)) for n in (6, 5, 3, 4, 2, 7)]
    packs = pack_examples(examples, max_length=10)
    assert [[e.source for e in p] for p in packs] == [["6", "3"], ["5", "4"], ["2", "7"]]
    assert all(sum(len(e) for e in p) <= 10 for p in packs)


def test_pack_collate_positions_labels_and_no_mask():
    batch = pack_collate(
        [[ex(3, prompt=0), ex(4, start=20, prompt=0)], [ex(2, prompt=0)]], pad_id=0, max_length=8
    )
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]]
    assert batch["input_ids"].tolist()[0] == [10, 11, 12, 20, 21, 22, 23, 0]
    # First label of every packed sample is masked, pads are masked.
    assert batch["labels"].tolist()[0] == [IGNORE_INDEX, 11, 12, IGNORE_INDEX, 21, 22, 23, IGNORE_INDEX]
    assert batch["labels"].tolist()[1] == [IGNORE_INDEX, 11] + [IGNORE_INDEX] * 6


def test_batches_deterministic_per_seed_and_epoch():
    examples = [ex(2 + i % 5, start=i * 10, source=str(i)) for i in range(20)]

    def run(**kw):
        return [b["input_ids"].tolist() for b in batches(examples, 4, 0, **kw)]

    first = run(seed=1, epoch=0)
    assert first == run(seed=1, epoch=0)
    assert first != run(seed=1, epoch=1) and first != run(seed=2, epoch=0)
    assert len(first) == 5
    unshuffled = batches(examples, 4, 0, seed=1, epoch=0, shuffle=False)
    assert unshuffled[0]["input_ids"][0, 0].item() == 0
    packed = batches(examples, 2, 0, seed=1, epoch=0, packing=True, max_length=12)
    assert all(b["input_ids"].shape[1] == 12 and "position_ids" in b for b in packed)
    packed_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in packed)
    assert packed_tokens == sum(len(e) - 2 for e in examples)  # prompt=2 tokens each are masked
    again = batches(examples, 2, 0, seed=1, epoch=0, packing=True, max_length=12)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(packed, again))


def tiny_llama(vocab_size: int, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert model.config._attn_implementation == attn
    return model


def packed_examples(tokenizer):
    records = [
        ("t:1", {"query": "Give the ISO date for: 1 August 1956", "response": "1956-08-01"}),
        ("t:2", {"query": "hello world", "response": "the quick brown fox"}),
        ("t:3", {"query": "what is the answer?", "response": "42"}),
        ("t:4", {"query": "Rewrite the date: 16 November 1985", "response": "1985-11-16"}),
    ]
    examples, _ = tokenize_samples(to_samples(records), tokenizer, "seed", max_length=128)
    return examples


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_match_samples_run_alone(tiny_tokenizer, attn):
    """No attention or position leakage: each packed sample's logits equal its logits run alone."""
    examples = packed_examples(tiny_tokenizer)
    model = tiny_llama(len(tiny_tokenizer), attn)
    width = sum(len(e) for e in examples[:3]) + 3
    packs = [examples[:3], examples[3:]]  # the second row is one sample plus padding
    batch = pack_collate(packs, tiny_tokenizer.pad_token_id, max_length=width)
    with torch.no_grad():
        # use_cache=False: with a KV cache transformers skips packed-sequence detection.
        packed_logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        for row, pack in enumerate(packs):
            start = 0
            for example in pack:
                n = len(example)
                alone = model(input_ids=torch.tensor([example.input_ids])).logits[0]
                torch.testing.assert_close(packed_logits[row, start : start + n], alone, atol=1e-5, rtol=0)
                start += n


def test_packed_loss_equals_token_weighted_mean_of_sample_losses(tiny_tokenizer):
    examples = packed_examples(tiny_tokenizer)
    model = tiny_llama(len(tiny_tokenizer), "sdpa")
    batch = pack_collate([examples], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        packed = model(**batch, use_cache=False).loss
        total, count = 0.0, 0
        for example in examples:
            labels = torch.tensor([example.labels])
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            loss = model(input_ids=torch.tensor([example.input_ids]), labels=labels).loss
            total, count = total + loss * n, count + n
    torch.testing.assert_close(packed, total / count, atol=1e-5, rtol=0)
