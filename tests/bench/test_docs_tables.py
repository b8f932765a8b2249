"""Every results table in README.md and docs/performance.md is bench/render_docs.py's rendering of
bench/results/*.json, so no figure in the docs drifts from its measurement (`make docs` re-renders)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def docs():
    spec = importlib.util.spec_from_file_location("render_docs", BENCH / "render_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_committed_tables_equal_their_rendering(docs):
    assert docs.check() == [], "run `make docs` (bench/render_docs.py) and commit the tables"


def test_every_renderer_is_used_and_every_marked_table_has_one(docs):
    used = [m.group("name") for path in docs.DOCS for m in docs.MARKER.finditer(path.read_text())]
    assert "speed" in used and sorted(set(used)) == sorted(docs.TABLES)


def test_every_results_file_is_cited_by_a_rendered_table(docs):
    rendered = "\n".join(render() for render in docs.TABLES.values())
    for path in sorted((BENCH / "results").glob("*.json")):
        json.loads(path.read_text())
        assert f"`{path.name}`" in rendered, f"{path.name} is in no table"


def test_a_tampered_table_is_detected(docs, tmp_path):
    text = (BENCH.parent / "docs" / "performance.md").read_text()
    assert "| 1.218x |" in text
    tampered = tmp_path / "performance.md"
    tampered.write_text(text.replace("| 1.218x |", "| 1.250x |", 1))
    assert [line.endswith(": peers") for line in docs.check([tampered])] == [True]
    readme = tmp_path / "README.md"
    readme.write_text((BENCH.parent / "README.md").read_text().replace("<!-- /table:speed -->",
                                                                          "| extra |\n<!-- /table:speed -->"))
    assert [line.endswith(": speed") for line in docs.check([readme])] == [True]
    assert docs.main(["--check"]) == 0


def test_an_unknown_table_name_is_an_error(docs):
    with pytest.raises(KeyError, match="no renderer"):
        docs.render("<!-- table:nonesuch -->\n<!-- /table:nonesuch -->")
