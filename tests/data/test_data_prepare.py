"""prepare_data: the whole chain from a recipe's DataConfig to tokenized train/eval examples."""

from __future__ import annotations

import json

import pytest

from deftune.config import DataConfig
from deftune.data import PreparedData, SplitSamples, prepare_data, read_samples
from deftune.data.readers import ASSETS_DIR
from deftune.errors import DeftuneError


def write_jsonl(path, n, offset=0):
    rows = [{"query": f"what is {i} plus one?", "response": str(i + 1)} for i in range(offset, offset + n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_split_from_train_is_seeded_and_keeps_samples(tmp_path, tiny_tokenizer):
    cfg = DataConfig(
        train=write_jsonl(tmp_path / "t.jsonl", 40), eval_fraction=0.25, split_seed=7, max_length=64
    )
    data = prepare_data(cfg, tiny_tokenizer)
    assert isinstance(data, PreparedData)
    assert (len(data.train), len(data.eval)) == (30, 10)
    assert [s.source for s in data.eval_samples] == [e.source for e in data.eval]
    assert not {s.source for s in data.train_samples} & {s.source for s in data.eval_samples}
    again = prepare_data(cfg, tiny_tokenizer)
    assert [e.input_ids for e in again.eval] == [e.input_ids for e in data.eval]
    assert data.stats["train"].examples == 30 and data.stats["eval"].records == 10


def test_explicit_eval_file_and_record_caps(tmp_path, tiny_tokenizer):
    cfg = DataConfig(
        train=write_jsonl(tmp_path / "t.jsonl", 20),
        eval=write_jsonl(tmp_path / "e.jsonl", 8, offset=100),
        max_train_records=5,
        max_eval_records=3,
        template="Q: {query}\nA: ",
    )
    data = prepare_data(cfg, tiny_tokenizer)
    assert [s.source for s in data.train_samples] == [f"{tmp_path / 't.jsonl'}:{i}" for i in range(1, 6)]
    assert [s.query for s in data.eval_samples] == [f"what is {i} plus one?" for i in (100, 101, 102)]
    assert len(data.train) == 5 and len(data.eval) == 3


def test_no_eval_when_fraction_zero(tmp_path, tiny_tokenizer):
    cfg = DataConfig(train=write_jsonl(tmp_path / "t.jsonl", 4), eval_fraction=0.0)
    data = prepare_data(cfg, tiny_tokenizer)
    assert len(data.train) == 4 and data.eval == [] and data.eval_samples == []


def test_bundled_demo_data(tiny_tokenizer):
    if not (ASSETS_DIR / "demo_train.jsonl").exists():
        pytest.skip("bundled demo data not present yet")
    data = prepare_data(DataConfig(train="demo", eval="demo-eval", max_length=128), tiny_tokenizer)
    assert data.stats["train"].skipped_prompt_too_long == 0 and data.train and data.eval
    assert data.train_samples[0].source == "demo_train.jsonl:1"


def test_read_samples_needs_no_tokenizer_and_prepare_does_not_read_again(tmp_path, tiny_tokenizer, monkeypatch):
    from deftune.data import prepare

    cfg = DataConfig(train=write_jsonl(tmp_path / "t.jsonl", 12), eval_fraction=0.25, max_length=64)
    samples = read_samples(cfg)
    assert isinstance(samples, SplitSamples) and (len(samples.train), len(samples.eval)) == (9, 3)

    def no_second_read(*args, **kwargs):
        raise AssertionError("prepare_data read the data again")

    monkeypatch.setattr(prepare, "read_records", no_second_read)
    data = prepare_data(cfg, tiny_tokenizer, samples)
    assert data.train_samples == samples.train and len(data.train) == 9 and len(data.eval) == 3


def test_malformed_record_is_reported_by_read_samples_with_file_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, 5)
    lines = path.read_text().splitlines()
    lines[2] = '{"query": "unfinished'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DeftuneError, match=f"{path}:3: invalid JSON"):
        read_samples(DataConfig(train=str(path)))
    lines[2] = '{"query": "no response"}'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DeftuneError, match=f"{path}:3: .*missing response"):
        read_samples(DataConfig(train=str(path)))


def test_empty_responses_are_counted_and_all_empty_is_refused_before_tokenizing(tmp_path, tiny_tokenizer):
    path = tmp_path / "t.jsonl"
    rows = [{"query": f"q{i}", "response": "" if i % 3 == 0 else f"a{i}"} for i in range(9)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = prepare_data(DataConfig(train=str(path), eval_fraction=0.0, max_length=64), tiny_tokenizer)
    assert data.stats["train"].skipped_empty_response == 3 and len(data.train) == 6
    assert data.train_sample_index == [i for i in range(9) if i % 3]
    path.write_text("".join(json.dumps({"query": f"q{i}", "response": " "}) + "\n" for i in range(4)))
    with pytest.raises(DeftuneError, match=f"{path}: every training record has an empty response"):
        read_samples(DataConfig(train=str(path), eval_fraction=0.0))
