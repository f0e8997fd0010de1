"""Figures in the docs come from results/*.json: markers in the Markdown are replaced by what the files hold.

The markers, expanded before the Markdown is parsed (by the mkdocs hook in site.py, and by `check` below):

    <!-- figure: bench_http -->              a table from tables.TABLES, with the file and command behind it
    {{ bench.json#/ratios/x | .2f }}          one value: a file under results/, a JSON pointer, a format spec
    {{ zero_shot.json#/table/dual encoder/test/all | pm }}   a {mean, std} object: '62.4 ± 0.6'
    <!-- source: bench.json -->               'From results/bench.json, written by `rac bench ...`.'

A marker naming a file, key or table that does not exist is an error, never a blank: the build fails. Markers
inside code (spans and fenced blocks) are examples and stay as written.

README.md is read as it is written (no hook renders it), so its figures are written out, each pinned to its
source by a comment right after it, which the check compares with the file (`--write` writes them again):

    the downstream items alone: 84.1<!-- = filters.json#/accuracy/source=downstream/all | .1f --> % top-1

    python docs/hooks/figures.py             # check every page's markers and README's pins; exit 1 naming each
    python docs/hooks/figures.py --write     # README's pinned figures written again from results/
    python docs/hooks/figures.py --from-manifest artifacts/demo/manifest.json   # results/build.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"
DOCS = ROOT / "docs"

Json: TypeAlias = dict[str, "Json"] | list["Json"] | str | int | float | bool | None

TABLE = re.compile(r"<!--\s*figure:\s*([\w-]+)\s*-->")
VALUE = re.compile(r"\{\{\s*([\w./-]+\.json)#(/[^|}]*?)\s*(?:\|\s*([^}]*?))?\s*\}\}")
SOURCE = re.compile(r"<!--\s*source:\s*([\w./-]+\.json)\s*-->")
PINNED = re.compile(r"([^\s*(]+)<!--\s*=\s*([\w./-]+\.json)#(/[^|]*?)\s*(?:\|\s*(.*?))?\s*-->")
README = ROOT / "README.md"
CODE = re.compile(r"(```.*?```|`[^`\n]+`)", re.S)  # fenced blocks and code spans


class FigureError(Exception):
    """A marker that names a file, key or table that does not exist (or a value of the wrong kind)."""


def pointer(*keys: str | int) -> str:
    """A JSON pointer (RFC 6901) to keys: '~' and '/' inside a key are escaped."""
    return "".join("/" + str(k).replace("~", "~0").replace("/", "~1") for k in keys)


@dataclass(frozen=True)
class Doc:
    """One results file, read once; every lookup names the file and key when it fails."""

    name: str  # relative to results/, e.g. "bench.json" or "load/summary.json"
    data: Json

    def get(self, *keys: str | int) -> Json:
        node = self.data
        for k in keys:
            key = str(k)
            if isinstance(node, dict) and key in node:
                node = node[key]
            elif isinstance(node, list) and key.lstrip("-").isdigit() and -len(node) <= int(key) < len(node):
                node = node[int(key)]
            else:
                raise FigureError(f"results/{self.name} has no key {pointer(*keys)!r}")
        return node

    def num(self, *keys: str | int) -> float:
        v = self.get(*keys)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise FigureError(f"results/{self.name}#{pointer(*keys)} is {v!r}, not a number")
        return float(v)

    def count(self, *keys: str | int) -> int:
        """The length of the list at keys."""
        v = self.get(*keys)
        if not isinstance(v, list):
            raise FigureError(f"results/{self.name}#{pointer(*keys)} is not a list")
        return len(v)

    def keys(self, *keys: str | int) -> list[str]:
        v = self.get(*keys)
        if not isinstance(v, dict):
            raise FigureError(f"results/{self.name}#{pointer(*keys)} is not an object")
        return list(v)

    def at(self, ptr: str) -> Json:
        """The value at a JSON pointer written in a marker ('/a/b~1c/0')."""
        return self.get(*(p.replace("~1", "/").replace("~0", "~") for p in ptr.split("/")[1:]))


def load(name: str, results: Path = RESULTS) -> Doc:
    path = results / name
    if not path.is_file():
        raise FigureError(f"results/{name} does not exist")
    try:
        return Doc(name, json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise FigureError(f"results/{name} is not JSON: {e}") from e


def fmt(v: Json, spec: str) -> str:
    """A value in a format spec ('.1f', ',.0f', ''), or 'pm' (pm2: two decimals) for a {mean, std} object as
    '23.4 ± 6.0', or 'met' for a goal's boolean ('met', 'missed'); numbers only take numeric specs."""
    if spec.startswith("pm"):
        if not (
            isinstance(v, dict) and isinstance(v.get("mean"), int | float) and isinstance(v.get("std"), int | float)
        ):
            raise FigureError(f"{v!r} is not a {{mean, std}} object for format {spec!r}")
        digits = int(spec[2:] or 1)
        return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"
    if spec == "met":  # a goal's boolean: 'met' or 'missed'
        if not isinstance(v, bool):
            raise FigureError(f"{v!r} is not a boolean for format 'met'")
        return "met" if v else "missed"
    if spec and not isinstance(v, int | float):
        raise FigureError(f"{v!r} is not a number for format {spec!r}")
    try:
        return format(v, spec)
    except (TypeError, ValueError) as e:
        raise FigureError(f"cannot format {v!r} with {spec!r}: {e}") from e


Rows: TypeAlias = tuple[list[str], list[list[str]]]  # a table's header and rows


@dataclass(frozen=True)
class Table:
    """A table rendered from results files: the files it reads, and its header and rows from them."""

    files: tuple[str, ...]
    render: Callable[[Sequence[Doc]], Rows]
    note: str = ""  # said under the table, before the source: what a reader must know to read it


def n(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def f2(x: float) -> str:
    return f"{x:,.2f}"


def pm(d: Doc, *keys: str) -> str:
    """'85.5 ± 0.1' from a {mean, std} object."""
    return f"{d.num(*keys, 'mean'):.1f} ± {d.num(*keys, 'std'):.1f}"


def met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        if len(r) != len(header):
            raise FigureError(f"a row of {len(r)} cells under a header of {len(header)}: {r}")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    return "\n".join(lines)


def source_line(files: Sequence[str], commands: dict[str, str]) -> str:
    """'From results/x.json, written by `cmd`; ...': what a reader needs to measure it again."""
    parts = []
    for f in files:
        if f not in commands:
            raise FigureError(f"results/{f} has no command recorded in tables.COMMANDS")
        parts.append(f"`results/{f}`, written by `{commands[f]}`")
    return "From " + "; ".join(parts) + "."


def expand(
    markdown: str,
    tables: dict[str, Table],
    commands: dict[str, str],
    results: Path = RESULTS,
    blocks: dict[str, Callable[[], str]] | None = None,
) -> str:
    """The Markdown with every marker replaced; FigureError listing every bad marker if any. `blocks` maps a
    marker `<!-- name -->` to what writes its text (the references generated from the code)."""
    problems: list[str] = []
    docs: dict[str, Doc] = {}

    def doc(name: str) -> Doc:
        if name not in docs:
            docs[name] = load(name, results)
        return docs[name]

    def guard(render: Callable[[re.Match[str]], str]) -> Callable[[re.Match[str]], str]:
        def wrapped(m: re.Match[str]) -> str:
            try:
                return render(m)
            except FigureError as e:
                problems.append(f"{m.group(0).strip()}: {e}")
                return m.group(0)

        return wrapped

    def table(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in tables:
            raise FigureError(f"no table {name!r} in tables.TABLES")
        t = tables[name]
        header, rows = t.render([doc(f) for f in t.files])
        note = f"{t.note} " if t.note else ""
        return f"{markdown_table(header, rows)}\n\n<small>{note}{source_line(t.files, commands)}</small>\n"

    def value(m: re.Match[str]) -> str:
        return fmt(doc(m.group(1)).at(m.group(2)), m.group(3) or "")

    def source(m: re.Match[str]) -> str:
        doc(m.group(1))  # it must exist
        return source_line([m.group(1)], commands)

    parts = CODE.split(markdown)  # odd parts are code: markers written there are examples, left as they are
    for i in range(0, len(parts), 2):
        for name, write in (blocks or {}).items():
            if f"<!-- {name} -->" in parts[i]:
                parts[i] = parts[i].replace(f"<!-- {name} -->", write())
        parts[i] = SOURCE.sub(guard(source), VALUE.sub(guard(value), TABLE.sub(guard(table), parts[i])))
    out = "".join(parts)
    if problems:
        raise FigureError("; ".join(problems))
    return out


def check(pages: Sequence[Path], tables: dict[str, Table], commands: dict[str, str]) -> list[str]:
    """Every marker of every page, and every table of the registry, expanded: the problems, a table that no page
    shows among them."""
    problems, shown = [], set()
    for page in pages:
        text = page.read_text()
        shown |= set(TABLE.findall(text))
        try:
            expand(text, tables, commands)
        except FigureError as e:
            problems.append(f"{page.relative_to(ROOT)}: {e}")
    problems += [f"tables.TABLES[{name!r}]: no page shows it" for name in tables if name not in shown]
    for name in tables:
        try:
            expand(f"<!-- figure: {name} -->", tables, commands)
        except FigureError as e:
            problems.append(f"tables.TABLES[{name!r}]: {e}")
    return problems


def pinned(markdown: str, results: Path = RESULTS) -> tuple[str, list[str], list[str]]:
    """README's pinned figures written from their files; the figures that differ from their files; and the
    problems: a pin naming a file or key that does not exist, or a marker that only the docs' hook renders."""
    stale: list[str] = []
    problems: list[str] = []

    def pin(m: re.Match[str]) -> str:
        written, name, ptr, spec = m.groups()
        try:
            want = fmt(load(name, results).at(ptr), spec or "")
        except FigureError as e:
            problems.append(f"{m.group(0)}: {e}")
            return m.group(0)
        if want != written:
            stale.append(f"{written} is {want} in results/{name}#{ptr} (--write writes it)")
        return m.group(0).replace(written, want, 1)

    parts = CODE.split(markdown)
    for i in range(0, len(parts), 2):
        if TABLE.search(parts[i]) or VALUE.search(parts[i]):
            problems.append("a figure marker that is not rendered here: pin the figure instead")
        parts[i] = PINNED.sub(pin, parts[i])
    return "".join(parts), stale, problems


def build_figures(manifest: Path, out: Path) -> None:
    """The figures `rac build` measured and wrote into an artifact's (git-ignored) manifest, kept under results/:
    the index it chose and the evaluation (validation and test top-1, the nprobe sweep)."""
    m = json.loads(manifest.read_text())
    keep = {k: m[k] for k in ("memory_version", "created", "index", "evaluation", "build")}
    out.write_text(json.dumps({"manifest": str(manifest), **keep}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-manifest", type=Path, help="write results/build.json from this manifest.json instead")
    p.add_argument("--write", action="store_true", help="write README's pinned figures from results/")
    a = p.parse_args(argv)
    if a.from_manifest:
        build_figures(a.from_manifest, RESULTS / "build.json")
        return 0
    sys.path.insert(0, str(Path(__file__).parent))
    from tables import COMMANDS, TABLES

    readme, stale, broken = pinned(README.read_text())
    if a.write:
        README.write_text(readme)
        stale = []
    found = check(sorted(DOCS.rglob("*.md")), TABLES, COMMANDS) + [f"README.md: {p}" for p in stale + broken]
    print("\n".join(found) or "every figure marker names a file and key that exist")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
