"""The docs' generated parts: every figure marker names a results file and key that exist, a bad one fails the
build naming it, and the settings and API references cover every setting and route of the code."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "hooks"))  # the mkdocs hook's modules, as mkdocs loads them

import figures  # noqa: E402
import reference  # noqa: E402
import tables  # noqa: E402

from service.settings import Settings  # noqa: E402


def test_every_marker_of_every_page_and_every_table_renders() -> None:
    pages = sorted((ROOT / "docs").rglob("*.md"))
    assert len(pages) > 10
    assert figures.check(pages, tables.TABLES, tables.COMMANDS) == []


def test_every_table_names_its_files_and_their_commands() -> None:
    for name, table in tables.TABLES.items():
        out = figures.expand(f"<!-- figure: {name} -->", tables.TABLES, tables.COMMANDS)
        for f in table.files:
            assert f"`results/{f}`, written by `{tables.COMMANDS[f]}`" in out, name


def test_every_figure_pinned_in_the_readme_is_its_files() -> None:
    _, stale, broken = figures.pinned(figures.README.read_text())
    assert stale == [] and broken == []


def test_a_pinned_figure_that_differs_from_its_file_is_found_and_written_again(results: Path) -> None:
    text = "top-1 1.3<!-- = r.json#/a/b~1c | .1f --> %, `x 9<!-- = r.json#/l/0 -->` and 7<!-- = r.json#/l/0 -->"
    written, stale, broken = figures.pinned(text, results)
    assert stale == ["1.3 is 1.2 in results/r.json#/a/b~1c (--write writes it)"] and broken == []
    assert written == text.replace("1.3<", "1.2<")  # the one in code is an example, left alone
    assert figures.pinned(written, results)[1:] == ([], [])
    _, _, broken = figures.pinned("9<!-- = r.json#/nope --> and {{ r.json#/l/0 }}", results)
    assert len(broken) == 2 and any("has no key '/nope'" in b for b in broken)
    assert any("not rendered here" in b for b in broken)


@pytest.fixture
def results(tmp_path: Path) -> Path:
    (tmp_path / "r.json").write_text(json.dumps({"a": {"b/c": 1.234, "s": {"mean": 2.0, "std": 0.5}}, "l": [7]}))
    return tmp_path


def expand(text: str, results: Path) -> str:
    return figures.expand(text, tables.TABLES, {"r.json": "make r"}, results)


def test_values_by_json_pointer(results: Path) -> None:
    assert expand("x {{ r.json#/a/b~1c | .1f }} y", results) == "x 1.2 y"
    assert expand("{{ r.json#/a/s | pm }} {{ r.json#/l/0 }}", results) == "2.0 ± 0.5 7"
    assert expand("<!-- source: r.json -->", results) == "From `results/r.json`, written by `make r`."
    (results / "g.json").write_text(json.dumps({"a": True, "b": False}))
    assert expand("{{ g.json#/a | met }}, {{ g.json#/b | met }}", results) == "met, missed"
    with pytest.raises(figures.FigureError, match="not a boolean"):
        expand("{{ r.json#/l/0 | met }}", results)


@pytest.mark.parametrize(
    ("marker", "problem"),
    [
        ("{{ missing.json#/a }}", "results/missing.json does not exist"),
        ("{{ r.json#/a/nope | .1f }}", "results/r.json has no key '/a/nope'"),
        ("{{ r.json#/a/s | .1f }}", "not a number"),
        ("{{ r.json#/a/b~1c | pm }}", "not a {mean, std} object"),
        ("<!-- figure: no_such_table -->", "no table 'no_such_table'"),
        ("<!-- source: missing.json -->", "results/missing.json does not exist"),
    ],
)
def test_a_marker_naming_what_does_not_exist_fails_naming_it(results: Path, marker: str, problem: str) -> None:
    with pytest.raises(figures.FigureError) as e:
        expand(f"before {marker} after", results)
    assert problem in str(e.value)


def test_a_table_whose_file_lacks_a_key_fails(tmp_path: Path) -> None:
    (tmp_path / "bench.json").write_text(json.dumps({"ceiling": {}}))
    with pytest.raises(figures.FigureError, match=re.escape("results/bench.json has no key '/ceiling/served_layout")):
        figures.expand("<!-- figure: bench_ceiling -->", tables.TABLES, tables.COMMANDS, tmp_path)


def test_markers_in_code_are_examples(results: Path) -> None:
    text = "`{{ missing.json#/a }}` and\n```\n<!-- figure: nope -->\n```\n"
    assert expand(text, results) == text


def test_the_settings_reference_has_every_setting_once() -> None:
    found = [s for _, fields in reference.settings() for s in fields]
    assert [s.name for s in found] == list(Settings.model_fields)
    by_name = {s.name: s for s in found}
    assert by_name["max_wait_ms"].env == "`RAC_MAX_WAIT_MS`"
    assert by_name["max_wait_ms"].default == "2.0"
    assert "cache lookup" in by_name["max_wait_ms"].description
    assert by_name["redis_url"].env == "`RAC_REDIS_URL` or `REDIS_URL`"
    assert all(s.description for s in found)


def test_a_setting_without_a_description_fails(tmp_path: Path) -> None:
    source = (ROOT / "service" / "settings.py").read_text()
    undocumented = source.replace("    backlog: int = 2048  # ", "    backlog: int = 2048\n    # ")
    assert undocumented != source
    (tmp_path / "settings.py").write_text(undocumented)
    with pytest.raises(figures.FigureError, match="setting 'backlog' has no description"):
        reference.settings(tmp_path / "settings.py")


def test_the_api_reference_has_every_route_and_schema() -> None:
    doc = reference.openapi()
    text = reference.openapi_markdown(doc)
    paths = doc["paths"]
    assert isinstance(paths, dict) and "/classify" in paths
    for path, ops in paths.items():
        assert isinstance(ops, dict)
        for method in ops:
            assert f"### `{method.upper()} {path}`" in text
    assert "### `ClassifyResponse`" in text
