"""The page that looks through the memory (`GET /`), its static files, the build's example images and the
memory items it shows (metadata and thumbnails). The page classifies through `POST /classify`, like every
other front-end; nothing here computes anything."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Annotated
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response

from service.api.routes import ERRORS, ErrorResponse, MemoryDep, PipelineDep
from service.artifacts import EXAMPLES
from service.errors import json_error
from service.memory.items import Item

router = APIRouter()

STATIC = Path(__file__).parent / "static"
STATIC_TYPES = {"page.css": "text/css; charset=utf-8", "page.js": "text/javascript; charset=utf-8"}
# A thumbnail URL that names the memory version never changes its bytes: a browser may keep it for good.
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"  # may be stored, but asked again (ETag) before each use
MAX_ID = 2**63 - 1  # SQLite's INTEGER range
# Declared as digits (not an int) so that the schema says what is accepted and a bad id is our own 422.
ItemId = Annotated[str, PathParam(pattern=r"^[0-9]+$", description="the item's id (stable across memory versions)")]
NOT_FOUND: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorResponse, "description": "no such file, item or memory"},
    401: ERRORS[401],
    403: ERRORS[403],
}


@lru_cache(maxsize=8)
def _static(name: str) -> tuple[bytes, str]:
    """A static file's bytes and its ETag (read once per process)."""
    data = (STATIC / name).read_bytes()
    return data, '"' + hashlib.blake2b(data, digest_size=8).hexdigest() + '"'


def _cached(request: Request, data: bytes, media_type: str, etag: str, cache: str) -> Response:
    headers = {"ETag": etag, "Cache-Control": cache}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=media_type, headers=headers)


def _item_id(raw: str) -> int | Response:
    """A path's item id, or the 422 for one that is not a non-negative integer."""
    if not raw.isascii() or not raw.isdigit():
        return json_error(422, f"item id must be a non-negative integer, not {raw!r}")
    return int(raw)


# ---------------------------------------------------------------- the page


@router.get("/", include_in_schema=False)
async def page(request: Request) -> Response:
    data, etag = _static("index.html")
    return _cached(request, data, "text/html; charset=utf-8", etag, REVALIDATE)


@router.get("/static/{name}", include_in_schema=False)
async def static(request: Request, name: str) -> Response:
    if name not in STATIC_TYPES:
        return json_error(404, f"no static file {name!r}")
    data, etag = _static(name)
    return _cached(request, data, STATIC_TYPES[name], etag, REVALIDATE)


# ---------------------------------------------------------------- the build's example images


@router.get("/examples", responses=NOT_FOUND)
async def examples(pipeline: PipelineDep, memory: MemoryDep) -> Response:
    """The example images the build wrote, with their true class and the class predicted offline."""
    with pipeline.holding(memory) as version:
        entries = [
            {
                "name": Path(str(e["file"])).name,
                "url": f"/examples/{Path(str(e['file'])).name}",
                "label": e.get("label"),
                "predicted": e.get("predicted"),
            }
            for e in version.manifest.examples
        ]
    return Response(orjson.dumps({"examples": entries}), media_type="application/json")


@router.get("/examples/{name}", responses=NOT_FOUND | {200: {"content": {"image/png": {}}}})
async def example(request: Request, pipeline: PipelineDep, memory: MemoryDep, name: str) -> Response:
    """One example image (PNG)."""
    with pipeline.holding(memory) as version:
        files = {Path(str(e["file"])).name for e in version.manifest.examples}
        path = version.directory / EXAMPLES / name
        if name not in files or not path.is_file():  # only names the manifest lists: no path reaches outside
            return json_error(404, f"no example image {name!r}")
        data = path.read_bytes()
    etag = '"' + hashlib.blake2b(data, digest_size=8).hexdigest() + '"'
    return _cached(request, data, "image/png", etag, REVALIDATE)


# ---------------------------------------------------------------- memory items
# One indexed SQLite row each: tens of microseconds, so read on the event loop rather than paying a thread hop.


def _item_body(found: Item, memory: str, version: str, has_thumbnail: bool, classes: list[str]) -> dict[str, object]:
    return {
        "id": found.id,
        "memory": memory,
        "key": found.key,
        "tags": list(found.tags),
        "text": found.text,
        "source": found.source,
        "label": classes[found.label],
        "label_index": found.label,
        "memory_version": version,
        "thumbnail": f"/items/{found.id}/thumbnail?{urlencode({'memory': memory, 'v': version})}"
        if has_thumbnail
        else None,
    }


@router.get("/items", responses={**NOT_FOUND, 422: ERRORS[422]})
async def item_by_key(
    pipeline: PipelineDep,
    memory: MemoryDep,
    key: str = Query(..., min_length=1, description="the item's key (unique in the memory)"),
) -> Response:
    """The memory item that carries `key`."""
    with pipeline.holding(memory) as served:
        found = served.memory.table.by_keys([key]).get(key)
        if found is None:
            return json_error(404, f"no memory item with key {key!r} (memory version {served.id})")
        has_thumbnail = served.memory.table.thumbnail(found.id) is not None
        body = _item_body(found, served.name, served.id, has_thumbnail, pipeline.manifest.classes)
    return Response(orjson.dumps(body), media_type="application/json")


@router.get("/items/{item_id}", responses={**NOT_FOUND, 422: ERRORS[422]})
async def item(pipeline: PipelineDep, memory: MemoryDep, item_id: ItemId) -> Response:
    """A memory item: its key and tags, text, source, the class its text names, and where its thumbnail is.
    Its id is stable: the same item in every memory version that holds it."""
    parsed = _item_id(item_id)
    if isinstance(parsed, Response):
        return parsed
    with pipeline.holding(memory) as served:
        found = served.memory.table.item(parsed) if parsed <= MAX_ID else None
        if found is None:
            return json_error(404, f"no memory item {parsed} (memory version {served.id})")
        has_thumbnail = served.memory.table.thumbnail(parsed) is not None
        body = _item_body(found, served.name, served.id, has_thumbnail, pipeline.manifest.classes)
    return Response(orjson.dumps(body), media_type="application/json")


@router.get(
    "/items/{item_id}/thumbnail", responses={**NOT_FOUND, 422: ERRORS[422], 200: {"content": {"image/png": {}}}}
)
async def thumbnail(
    request: Request,
    pipeline: PipelineDep,
    memory: MemoryDep,
    item_id: ItemId,
    v: str | None = Query(None, description="the memory version the page saw it in; set: cached for good"),
) -> Response:
    """A memory item's thumbnail (PNG, at most 48 px). An id names one item for good, so with `v` (the
    memory version the URL was made for) it is immutable."""
    parsed = _item_id(item_id)
    if isinstance(parsed, Response):
        return parsed
    with pipeline.holding(memory) as served:
        if parsed > MAX_ID or served.memory.table.item(parsed) is None:
            return json_error(404, f"no memory item {parsed} (memory version {served.id})")
        data = served.memory.table.thumbnail(parsed)
    if data is None:
        return json_error(404, f"memory item {parsed} has no thumbnail: its memory was built or extended without one")
    etag = '"' + hashlib.blake2b(data, digest_size=8).hexdigest() + '"'
    return _cached(request, data, "image/png", etag, IMMUTABLE if v else REVALIDATE)
