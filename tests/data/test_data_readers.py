"""read_records: every file format, saved datasets folders, hub ids offline, and the error messages."""

from __future__ import annotations

import json

import pytest

from deftune.data import read_records
from deftune.data.readers import ASSETS_DIR
from deftune.errors import DeftuneError

ROWS = [{"query": "q1", "response": "r1"}, {"query": "q2", "response": "r2"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_jsonl_locations_are_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    out = read_records(str(path))
    assert [rec for _, rec in out] == ROWS
    # The blank line is skipped but still counted, so locations match what an editor shows.
    assert [loc for loc, _ in out] == [f"{path}:1", f"{path}:3"]


def test_ndjson_and_bom(tmp_path):
    path = tmp_path / "x.ndjson"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\n")
    assert read_records(str(path)) == [(f"{path}:1", ROWS[0])]


@pytest.mark.parametrize("tree", [ROWS, {"data": ROWS}, {"examples": ROWS}])
def test_json_list_shapes(tmp_path, tree):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(tree), encoding="utf-8")
    out = read_records(str(path))
    assert [rec for _, rec in out] == ROWS
    assert out[1][0] == f"{path}:item 2"


def test_json_single_chat_object(tmp_path):
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = tmp_path / "one.json"
    path.write_text(json.dumps(record), encoding="utf-8")
    assert read_records(str(path)) == [(f"{path}:item 1", record)]


def test_csv(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('query,response\nq1,r1\n"q2, with comma",r2\n', encoding="utf-8")
    out = read_records(str(path))
    assert out == [
        (f"{path}:row 1", {"query": "q1", "response": "r1"}),
        (f"{path}:row 2", {"query": "q2, with comma", "response": "r2"}),
    ]


def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "train.parquet"
    pd.DataFrame(ROWS).to_parquet(path)
    out = read_records(str(path))
    assert out == [(f"{path}:row 1", ROWS[0]), (f"{path}:row 2", ROWS[1])]


def test_saved_dataset_folder_and_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "single"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(single))
    assert [rec for _, rec in read_records(str(single))] == ROWS

    both = tmp_path / "dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "validation": datasets.Dataset.from_list(ROWS[:1])}
    ).save_to_disk(str(both))
    train = read_records(str(both))
    assert [rec for _, rec in train] == ROWS
    assert train[0][0] == f"{both}[train]:row 1"
    assert [rec for _, rec in read_records(f"{both}:validation")] == ROWS[:1]
    assert [rec for _, rec in read_records(str(both), split="validation")] == ROWS[:1]
    with pytest.raises(DeftuneError, match="no split 'test'.*train, validation"):
        read_records(f"{both}:test")


def test_folder_not_saved_by_datasets(tmp_path):
    pytest.importorskip("datasets")
    with pytest.raises(DeftuneError, match="not one written by datasets"):
        read_records(str(tmp_path))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The libraries read these variables at import time; other tests may have imported them already.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(DeftuneError) as info:
        read_records("some-org/no-such-dataset-xyz")
    message = str(info.value)
    assert "some-org/no-such-dataset-xyz" in message
    assert "no network" in message and ".jsonl" in message


def test_demo_sources_resolve_to_assets():
    if not (ASSETS_DIR / "demo_train.jsonl").exists():
        pytest.skip("bundled demo data not present yet")
    out = read_records("demo")
    assert out and out[0][0] == "demo_train.jsonl:1"
    assert read_records("demo-eval")[0][0] == "demo_eval.jsonl:1"


@pytest.mark.parametrize("name", ["missing.jsonl", "data/sub/missing", "./missing"])
def test_missing_file_names_the_path(tmp_path, name):
    source = str(tmp_path / name) if not name.startswith(".") else name
    with pytest.raises(DeftuneError, match="not found.*missing"):
        read_records(source)


def test_malformed_json_line_reports_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"query": "q2", "response": }\n', encoding="utf-8")
    with pytest.raises(DeftuneError, match=r"bad\.jsonl:2: invalid JSON: Expecting value"):
        read_records(str(path))


def test_malformed_json_file_reports_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"query": "q"},\n{oops}\n]', encoding="utf-8")
    with pytest.raises(DeftuneError, match=r"bad\.json:3: invalid JSON"):
        read_records(str(path))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_empty_file_has_no_records(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_text("\n" if suffix == ".jsonl" else "", encoding="utf-8")
    with pytest.raises(DeftuneError, match="no records"):
        read_records(str(path))


def test_non_utf8_file_reports_byte_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + '{"query": "caf\xe9"}\n'.encode("latin-1"))
    offset = len(json.dumps(ROWS[0]).encode()) + 1 + len(b'{"query": "caf')
    with pytest.raises(DeftuneError, match=rf"latin1\.jsonl: not valid UTF-8 at byte {offset} \(line 2\)"):
        read_records(str(path))


def test_record_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(DeftuneError, match=r"list\.jsonl:2: expected a JSON object.*list"):
        read_records(str(path))


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(DeftuneError, match="unsupported file type '.txt'"):
        read_records(str(path))
