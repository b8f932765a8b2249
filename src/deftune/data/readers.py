"""Read raw records from a file, a saved `datasets` folder or a dataset hub id.

Every record comes back with its location (``train.jsonl:12``, ``data.csv:row 5``) so that the format
checks further down the pipeline can point the user at the exact line to fix.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from deftune.errors import DeftuneError, require

# Bundled data sets, resolved next to the package so an installed wheel finds them too.
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
SPECIAL_SOURCES = {"demo": "demo_train.jsonl", "demo-eval": "demo_eval.jsonl"}

JSONL_SUFFIXES = (".jsonl", ".ndjson")
FILE_SUFFIXES = (*JSONL_SUFFIXES, ".json", ".csv", ".parquet")
LOCAL_HINT = (
    "To use local data instead, point data.train / data.eval at a .jsonl, .json, .csv or .parquet file "
    "or at a folder written by datasets' save_to_disk."
)

Record = dict[str, Any]


def resolve_source(source: str) -> Path | None:
    """The local path a source names ("demo" -> the bundled file), or None when it is not local."""
    if source in SPECIAL_SOURCES:
        return ASSETS_DIR / SPECIAL_SOURCES[source]
    path = Path(source).expanduser()
    return path if path.exists() else None


def read_records(source: str, split: str | None = None) -> list[tuple[str, Record]]:
    """Read every record of ``source`` as ``(location, record)`` pairs.

    ``source`` is a .jsonl/.ndjson/.json/.csv/.parquet file, a folder saved by ``datasets``
    (``save_to_disk``), "demo"/"demo-eval", or a dataset hub id. A split of a saved DatasetDict or of a
    hub data set is chosen by ``split`` or by a ``:split`` suffix (``my_folder:validation``); the
    default is "train".
    """
    source = str(source).strip()
    if not source:
        raise DeftuneError("No data source given: set data.train to a file, a folder or a dataset id")
    path = resolve_source(source)
    if path is None and split is None and ":" in source:
        # "folder:validation" / "org/name:test" select a split; only when the whole string is no path.
        base, _, maybe_split = source.rpartition(":")
        if base and maybe_split and "/" not in maybe_split and "\\" not in maybe_split:
            source, split = base, maybe_split
            path = resolve_source(source)
    if path is None:
        if source in SPECIAL_SOURCES:
            raise DeftuneError(
                f"The bundled data set '{source}' is missing: expected {ASSETS_DIR / SPECIAL_SOURCES[source]}"
                " (is deftune installed completely?)"
            )
        if _looks_like_path(source):
            raise DeftuneError(
                f"Data file not found: {source} (resolved to {Path(source).expanduser().resolve()})"
            )
        return _read_hub(source, split)
    if path.is_dir():
        return _read_saved_dataset(path, source, split)
    records = _read_file(path, _display_name(source, path))
    if not records:
        raise DeftuneError(f"{source}: no records found (the file holds no data rows)")
    return records


def _display_name(source: str, path: Path) -> str:
    # Locations use the name the user wrote; the bundled sets show their file name.
    return path.name if source in SPECIAL_SOURCES else source


def _looks_like_path(source: str) -> bool:
    """A missing local file must not be sent to the hub: "org/name" is a hub id, "data/x.jsonl" is not."""
    if source.lower().endswith(FILE_SUFFIXES):
        return True
    if source.startswith((".", "/", "~", "\\")) or "\\" in source:
        return True
    return source.count("/") > 1


def _read_file(path: Path, name: str) -> list[tuple[str, Record]]:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path, name)
    if suffix == ".json":
        return _read_json(path, name)
    if suffix == ".csv":
        return _read_csv(path, name)
    if suffix == ".parquet":
        return _read_parquet(path, name)
    raise DeftuneError(
        f"{name}: unsupported file type '{suffix or '(no suffix)'}'; "
        f"supported: {', '.join(FILE_SUFFIXES)} or a folder saved by datasets' save_to_disk"
    )


def _read_text(path: Path, name: str) -> str:
    data = path.read_bytes()
    try:
        # utf-8-sig drops the byte-order mark that spreadsheet exports put first.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DeftuneError(
            f"{name}: not valid UTF-8 at byte {exc.start} (line {line}): {exc.reason}. "
            "Re-save the file as UTF-8."
        ) from exc


def _check_object(location: str, record: Any) -> Record:
    if not isinstance(record, dict):
        raise DeftuneError(f"{location}: expected a JSON object ({{...}}), got {type(record).__name__}")
    return record


def _read_jsonl(path: Path, name: str) -> list[tuple[str, Record]]:
    records = []
    for number, line in enumerate(_read_text(path, name).splitlines(), start=1):
        if not line.strip():
            continue
        location = f"{name}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DeftuneError(f"{location}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
        records.append((location, _check_object(location, record)))
    return records


def _read_json(path: Path, name: str) -> list[tuple[str, Record]]:
    text = _read_text(path, name)
    if not text.strip():
        return []
    try:
        tree = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DeftuneError(f"{name}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
    if isinstance(tree, dict):
        lists = [key for key, value in tree.items() if isinstance(value, list)]
        if isinstance(tree.get("data"), list):
            tree = tree["data"]
        elif len(tree) == 1 and lists and lists[0] != "messages":
            # {"examples": [...]}: one list under any key; {"messages": [...]} is a single chat record.
            tree = tree[lists[0]]
        else:
            tree = [tree]
    if not isinstance(tree, list):
        raise DeftuneError(f'{name}: expected a JSON list of objects or {{"data": [...]}}')
    return [
        (f"{name}:item {i}", _check_object(f"{name}:item {i}", record)) for i, record in enumerate(tree, 1)
    ]


def _read_csv(path: Path, name: str) -> list[tuple[str, Record]]:
    text = _read_text(path, name)
    try:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise DeftuneError(f"{name}: malformed CSV: {exc}") from exc
    records = []
    for i, row in enumerate(rows, start=1):
        location = f"{name}:row {i}"
        if None in row:
            raise DeftuneError(f"{location}: more cells than header columns ({len(row) - 1} columns)")
        # Short rows fill missing cells with None; the format check reports them as missing fields.
        records.append((location, {k: v for k, v in row.items() if v is not None}))
    return records


def _read_parquet(path: Path, name: str) -> list[tuple[str, Record]]:
    pq = require("pyarrow.parquet", "data", "Reading Parquet files")
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DeftuneError(f"{name}: could not read as Parquet: {exc}") from exc
    return [(f"{name}:row {i}", row) for i, row in enumerate(rows, start=1)]


def _pick_split(available: list[str], split: str | None, name: str) -> str:
    if split is not None:
        if split not in available:
            raise DeftuneError(f"{name}: no split '{split}'; available splits: {', '.join(available)}")
        return split
    if "train" in available:
        return "train"
    if len(available) == 1:
        return available[0]
    raise DeftuneError(
        f"{name}: holds splits {', '.join(available)} but no 'train'; choose one as {name}:<split>"
    )


def _rows(dataset, name: str) -> list[tuple[str, Record]]:
    rows = dataset.to_list()
    if not rows:
        raise DeftuneError(f"{name}: no records found")
    return [(f"{name}:row {i}", _check_object(f"{name}:row {i}", row)) for i, row in enumerate(rows, 1)]


def _read_saved_dataset(path: Path, source: str, split: str | None) -> list[tuple[str, Record]]:
    datasets = require("datasets", "data", "Reading a folder saved by datasets")
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise DeftuneError(
            f"{source} is a folder but not one written by datasets' save_to_disk ({exc}). " + LOCAL_HINT
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        chosen = _pick_split(list(loaded.keys()), split, source)
        return _rows(loaded[chosen], f"{source}[{chosen}]")
    if split is not None:
        raise DeftuneError(f"{source} holds a single Dataset, not splits; drop ':{split}'")
    return _rows(loaded, source)


def _read_hub(source: str, split: str | None) -> list[tuple[str, Record]]:
    datasets = require("datasets", "data", f"Loading the dataset '{source}' from the hub")
    chosen = split or "train"
    try:
        dataset = datasets.load_dataset(source, split=chosen)
    except Exception as exc:  # offline, unknown id, missing split, gated: all surface as many types
        raise DeftuneError(
            f"Could not fetch the dataset '{source}' (split '{chosen}') from the Hugging Face Hub: "
            f"no network access, or no such dataset or split ({type(exc).__name__}: {exc}). "
            f"'{source}' is not a local path either. " + LOCAL_HINT
        ) from exc
    return _rows(dataset, f"{source}[{chosen}]")
