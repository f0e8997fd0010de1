"""Reference pages written from the code itself: the settings (service/settings.py, its fields and the comments
beside them) and the HTTP API (the app's own OpenAPI document), so that neither can drift from what runs."""

from __future__ import annotations

import ast
import functools
import io
import json
import tokenize
from dataclasses import dataclass
from pathlib import Path

from figures import ROOT, FigureError, Json
from pydantic import AliasChoices

SETTINGS = ROOT / "service" / "settings.py"


@dataclass(frozen=True)
class Setting:
    name: str
    env: str  # the environment variable(s) that set it
    type: str  # as annotated
    default: str
    description: str


def _comments(source: str) -> dict[int, str]:
    """Line number -> the text of the comment on it."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}


def _setting_default(name: str, value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) and name.endswith("_bytes") and value % (1 << 20) == 0:
        return f"{value} ({value >> 20} MiB)"
    return f"`{value}`" if isinstance(value, str | Path) else str(value)


def settings(path: Path = SETTINGS) -> list[tuple[str, list[Setting]]]:
    """The Settings class's fields in source order, grouped under the comment headings of the file.

    A field's description is its Field(description=...), else its trailing comment, else the comment lines right
    above it. A comment block that follows a blank line opens a section: its first line is the section's heading.
    """
    from service.settings import Settings  # the class as it runs: defaults, aliases, the env prefix

    source = path.read_text()
    lines, comments = source.splitlines(), _comments(source)
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "Settings")
    prefix = str(Settings.model_config.get("env_prefix", ""))
    sections: list[tuple[str, list[Setting]]] = [("General", [])]
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name, field = node.target.id, Settings.model_fields[node.target.id]
        above: list[str] = []
        i = node.lineno - 1  # 1-based: the line above the field
        while i >= 1 and lines[i - 1].strip().startswith("#"):
            above.insert(0, comments[i])
            i -= 1
        if above and i >= 1 and not lines[i - 1].strip():  # a block after a blank line: a section heading first
            sections.append((above.pop(0), []))
        trailing = [comments[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in comments]
        description = field.description or " ".join(trailing or above)
        if not description:
            raise FigureError(f"{path}:{node.lineno}: setting {name!r} has no description")
        alias = field.validation_alias
        env = (
            " or ".join(f"`{c}`" for c in alias.choices if isinstance(c, str))
            if isinstance(alias, AliasChoices)
            else f"`{prefix}{name}`".upper()
        )
        sections[-1][1].append(
            Setting(name, env, ast.unparse(node.annotation), _setting_default(name, field.default), description)
        )
    return [(heading, fields) for heading, fields in sections if fields]


def settings_markdown() -> str:
    out = []
    for heading, fields in settings():
        out += [f"### {heading}", "", "| variable | default | type | |", "| --- | --- | --- | --- |"]
        out += [f"| {s.env} | {s.default} | `{s.type}` | {_cell(s.description)} |" for s in fields]
        out.append("")
    return "\n".join(out)


@functools.cache
def openapi() -> dict[str, Json]:
    """The OpenAPI document of the app `python -m service` serves (no artifacts are loaded to make it); made once
    a build, read only."""
    from service.app import create_app
    from service.settings import Settings

    doc: dict[str, Json] = json.loads(json.dumps(create_app(Settings()).openapi()))
    return doc


def _obj(v: Json) -> dict[str, Json]:
    return v if isinstance(v, dict) else {}


def _type(schema: dict[str, Json]) -> str:
    """A schema's type in words, a named schema as a link to its section below."""
    if "anyOf" in schema:
        return " or ".join(_type(_obj(s)) for s in _list(schema["anyOf"]))
    if "$ref" in schema:
        name = str(schema["$ref"]).rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if schema.get("type") == "array":
        return f"array of {_type(_obj(schema.get('items')))}"
    if schema.get("type") == "object" and "additionalProperties" in schema:
        return f"object of {_type(_obj(schema.get('additionalProperties')))}"
    return str(schema.get("type", "any"))


def _cell(text: Json) -> str:
    return " ".join(str(text or "").split()).replace("|", "\\|")


def _schema_default(schema: dict[str, Json]) -> str:
    return f"`{json.dumps(schema['default'])}`" if "default" in schema else ""


def openapi_markdown(doc: dict[str, Json]) -> str:
    """Every route of the document (what it does, its parameters, what it takes, every answer it gives and in
    which schema), then every schema with its fields."""
    out = ["## Routes", ""]
    for path, ops in _obj(doc.get("paths")).items():
        for method, op in _obj(ops).items():
            o = _obj(op)
            out += [f"### `{method.upper()} {path}`", "", str(o.get("description") or o.get("summary") or ""), ""]
            params = [_obj(p) for p in _list(o.get("parameters"))]
            if params:
                out += ["| parameter | in | type | required | default | |", "| --- | --- | --- | --- | --- | --- |"]
                for p in params:
                    s, req = _obj(p.get("schema")), "yes" if p.get("required") else ""
                    out.append(
                        f"| `{p.get('name')}` | {p.get('in')} | {_type(s)} | {req} | {_schema_default(s)} | "
                        f"{_cell(p.get('description'))} |"
                    )
                out.append("")
            body = _obj(_obj(o.get("requestBody")).get("content"))
            if body:
                out += ["Body: " + ", ".join(f"`{t}`" for t in body), ""]
            out += ["| status | | body |", "| --- | --- | --- |"]
            for status, answer in sorted(_obj(o.get("responses")).items()):
                a = _obj(answer)
                schemas = [_type(_obj(_obj(c).get("schema"))) for c in _obj(a.get("content")).values()]
                out.append(
                    f"| {status} | {_cell(a.get('description'))} | {', '.join(s for s in schemas if s != 'any')} |"
                )
            out.append("")
    out += ["## Schemas", ""]
    for name, schema in _obj(_obj(doc.get("components")).get("schemas")).items():
        s = _obj(schema)
        required = {str(r) for r in _list(s.get("required"))}
        out += [f"### `{name}`", "", _cell(s.get("description")), "", "| field | type | required | |"]
        out.append("| --- | --- | --- | --- |")
        for field, spec in _obj(s.get("properties")).items():
            f = _obj(spec)
            req = "yes" if field in required else ""
            out.append(f"| `{field}` | {_type(f)} | {req} | {_cell(f.get('description'))} |")
        out.append("")
    return "\n".join(out)


def _list(v: Json) -> list[Json]:
    return v if isinstance(v, list) else []
