"""The published OpenAPI document, completed once the artifacts are loaded: what a request may name (the
largest `neighbors`, the sources, tags and memories there are) and, with API keys, the bearer scheme."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from service.auth import Keys
from service.core.pipeline import Pipeline

ENUM_LIMIT = 1000  # sources or tags listed in the published schema; beyond, the names are left open


def document(app: FastAPI) -> None:
    """Publish the schema with what is known once the artifacts are loaded: the largest `neighbors` (k), and
    the sources and tags a filter may name (the memory served when the schema is first asked for)."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        schema = default()  # built once, then cached by FastAPI
        pipeline: Pipeline | None = getattr(app.state, "pipeline", None)
        if pipeline is None:
            return schema
        keys: Keys = app.state.keys
        if keys.enabled:  # every route but health, readiness and the page needs a bearer key
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
            for path in ("/healthz", "/readyz"):
                for operation in schema["paths"].get(path, {}).values():
                    operation["security"] = []
        filters = pipeline.version.memory.filters
        names = {"source": filters.source_names, "tag": sorted(filters.tags), "memory": pipeline.memories.names}
        for operation in (op for item in schema["paths"].values() for op in item.values()):
            for p in operation.get("parameters", []):
                if p["name"] == "memory":  # the memories there are (a key may reach fewer: 403)
                    _names(p["schema"], pipeline.memories.names)
        for path in ("/classify", "/classify/batch", "/classify/zero-shot"):
            for p in schema["paths"][path]["post"]["parameters"]:
                if p["name"] == "neighbors" and path != "/classify/zero-shot":
                    p["schema"]["maximum"] = pipeline.k
                known = names.get(p["name"])
                if known is not None and len(known) <= ENUM_LIMIT and p["name"] != "memory":
                    _name_list(p["schema"], known)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _names(param: dict[str, Any], names: list[str]) -> None:
    """A name parameter's schema (FastAPI writes it as anyOf[string, null]) limited to `names`."""
    for option in param.get("anyOf", [param]):
        if option.get("type") == "string":
            option["enum"] = names


def _name_list(param: dict[str, Any], names: list[str]) -> None:
    """A list-of-names parameter's schema (FastAPI writes it as anyOf[array, null]) limited to `names`."""
    for option in param.get("anyOf", [param]):
        if option.get("type") == "array":
            if names:
                option["items"] = {"type": "string", "enum": names}
            else:
                option["maxItems"] = 0
