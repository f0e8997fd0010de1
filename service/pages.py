"""The page that looks through the memory (`GET /`), its static files, the build's example images and the
memory items it shows (metadata and thumbnails). The page classifies through `POST /classify`, like every
other front-end; nothing here computes anything."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Annotated

import orjson
from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response

from service import artifacts as A
from service.api import ERRORS, ErrorResponse, PipelineDep, error
from service.pipeline import Pipeline
from service.versions import MemoryVersion

router = APIRouter()

STATIC = Path(__file__).parent / "static"
STATIC_TYPES = {"page.css": "text/css; charset=utf-8", "page.js": "text/javascript; charset=utf-8"}
# A thumbnail URL that names the memory version never changes its bytes: a browser may keep it for good.
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"  # may be stored, but asked again (ETag) before each use
MAX_ID = 2**63 - 1  # SQLite's INTEGER range
# Declared as digits (not an int) so that the schema says what is accepted and a bad id is our own 422.
ItemId = Annotated[str, PathParam(pattern=r"^[0-9]+$", description="the item's id in the memory version served")]
NOT_FOUND: dict[int | str, dict[str, object]] = {404: {"model": ErrorResponse, "description": "no such file or item"}}


@lru_cache(maxsize=8)
def _static(name: str) -> tuple[bytes, str]:
    """A static file's bytes and its ETag (read once per process)."""
    data = (STATIC / name).read_bytes()
    return data, '"' + hashlib.blake2b(data, digest_size=8).hexdigest() + '"'


@contextmanager
def _served(pipeline: Pipeline) -> Iterator[MemoryVersion]:
    """The memory version in service, held (as a request holds it) so that a swap cannot close it under us."""
    version = pipeline.version.acquire()
    try:
        yield version
    finally:
        version.release()


def _cached(request: Request, data: bytes, media_type: str, etag: str, cache: str) -> Response:
    headers = {"ETag": etag, "Cache-Control": cache}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=media_type, headers=headers)


def _item_id(raw: str) -> int | Response:
    """A path's item id, or the 422 for one that is not a non-negative integer."""
    if not raw.isascii() or not raw.isdigit():
        return error(422, f"item id must be a non-negative integer, not {raw!r}")
    return int(raw)


# ---------------------------------------------------------------- the page


@router.get("/", include_in_schema=False)
async def page(request: Request) -> Response:
    data, etag = _static("index.html")
    return _cached(request, data, "text/html; charset=utf-8", etag, REVALIDATE)


@router.get("/static/{name}", include_in_schema=False)
async def static(request: Request, name: str) -> Response:
    if name not in STATIC_TYPES:
        return error(404, f"no static file {name!r}")
    data, etag = _static(name)
    return _cached(request, data, STATIC_TYPES[name], etag, REVALIDATE)


# ---------------------------------------------------------------- the build's example images


@router.get("/examples")
async def examples(pipeline: PipelineDep) -> Response:
    """The example images the build wrote, with their true class and the class predicted offline."""
    with _served(pipeline) as version:
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
async def example(request: Request, pipeline: PipelineDep, name: str) -> Response:
    """One example image (PNG)."""
    with _served(pipeline) as version:
        files = {Path(str(e["file"])).name for e in version.manifest.examples}
        path = version.directory / A.EXAMPLES / name
        if name not in files or not path.is_file():  # only names the manifest lists: no path reaches outside
            return error(404, f"no example image {name!r}")
        data = path.read_bytes()
    etag = '"' + hashlib.blake2b(data, digest_size=8).hexdigest() + '"'
    return _cached(request, data, "image/png", etag, REVALIDATE)


# ---------------------------------------------------------------- memory items
# One indexed SQLite row each: tens of microseconds, so read on the event loop rather than paying a thread hop.


@router.get("/items/{item_id}", responses={**NOT_FOUND, 422: ERRORS[422]})
async def item(pipeline: PipelineDep, item_id: ItemId) -> Response:
    """A memory item: its text, source, the class its text names, and where its thumbnail is."""
    parsed = _item_id(item_id)
    if isinstance(parsed, Response):
        return parsed
    with _served(pipeline) as served:
        version = served.id
        found = served.memory.item(parsed) if parsed <= MAX_ID else None
        if found is None:
            return error(404, f"no memory item {parsed} (memory version {version})")
        has_thumbnail = served.memory.thumbnail(parsed) is not None
    body = {
        "id": found.id,
        "text": found.text,
        "source": found.source,
        "label": pipeline.manifest.classes[found.label],
        "label_index": found.label,
        "memory_version": version,
        "thumbnail": f"/items/{found.id}/thumbnail?v={version}" if has_thumbnail else None,
    }
    return Response(orjson.dumps(body), media_type="application/json")


@router.get(
    "/items/{item_id}/thumbnail", responses={**NOT_FOUND, 422: ERRORS[422], 200: {"content": {"image/png": {}}}}
)
async def thumbnail(
    request: Request,
    pipeline: PipelineDep,
    item_id: ItemId,
    v: str | None = Query(None, description="the memory version the id belongs to; set: cached for good"),
) -> Response:
    """A memory item's thumbnail (PNG, at most 48 px). With `v` (the memory version) it is immutable."""
    parsed = _item_id(item_id)
    if isinstance(parsed, Response):
        return parsed
    with _served(pipeline) as served:
        version = served.id
        if v is not None and v != version:
            return error(404, f"memory version {v} is not served here (this is {version}): ids differ between versions")
        if parsed > MAX_ID or served.memory.item(parsed) is None:
            return error(404, f"no memory item {parsed} (memory version {version})")
        data = served.memory.thumbnail(parsed)
    if data is None:
        return error(404, f"memory item {parsed} has no thumbnail: its memory was built or extended without one")
    return _cached(request, data, "image/png", f'"{version}-{parsed}"', IMMUTABLE if v else REVALIDATE)
