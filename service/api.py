"""HTTP routes and their schemas. No numeric work here: parse, call the pipeline, serialise."""

from __future__ import annotations

import hmac
import os
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel

from service import artifacts as A
from service.decode import DecodeError
from service.metrics import Metrics
from service.pipeline import Classification, Pipeline
from service.upload import UploadError, read_images

router = APIRouter()


# ---------------------------------------------------------------- schemas (for the OpenAPI page)


class Prediction(BaseModel):
    label: str
    index: int
    probability: float


class Neighbor(BaseModel):
    id: int
    text: str
    source: str  # "downstream" (the training set) or "external"
    label: str  # the class the item's text names
    similarity: float  # cosine similarity of its image to the query
    attention: float  # the head's last-layer attention weight on it


class ClassifyResponse(BaseModel):
    predictions: list[Prediction]
    neighbors: list[Neighbor]
    memory_version: str
    cached: bool  # the neighbours came from the cache (decode, encode and search were skipped)
    timings_ms: dict[str, float]  # decode, queue, encode, search, head (batch stages: the batch's), total


class BatchEntry(BaseModel):
    status: int  # 200, or the 4xx this image alone earned
    result: ClassifyResponse | None = None
    detail: str | None = None


class BatchResponse(BaseModel):
    results: list[BatchEntry]


class ErrorResponse(BaseModel):
    detail: str


def _image_body(field: str, many: bool) -> dict[str, object]:
    file = {"type": "string", "format": "binary"}
    prop = {"type": "array", "items": file, "minItems": 1} if many else file
    form = {"type": "object", "properties": {field: prop}, "required": [field]}
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": form}, "image/png": {"schema": file}},
        }
    }


ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "empty, truncated or corrupt image"),
        (413, "body, image or pixel count over the limit"),
        (415, "not multipart/form-data, or not a PNG, JPEG or WebP image"),
        (422, "bad query values or no image field"),
        (503, "overloaded (Retry-After) or not ready"),
    )
}


# ---------------------------------------------------------------- dependencies


# Dependencies are async: FastAPI runs plain `def` ones in a worker thread, a thread hop per request.
async def get_pipeline(request: Request) -> Pipeline:
    pipeline: Pipeline | None = getattr(request.app.state, "pipeline", None)
    if pipeline is None:
        raise HTTPException(503, "not ready: the artifacts are still loading", headers={"Retry-After": "1"})
    return pipeline


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
TopK = Annotated[int, Query(ge=1, le=1000, description="how many classes to return (at most all of them)")]
# At most k (the neighbours the service retrieves, in /info): the published schema says so (document()).
Neighbors = Annotated[int, Query(ge=0, description="how many retrieved memory items to return (at most k)")]


def _json(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), status, headers, media_type="application/json"
    )


def error(status: int, detail: str) -> Response:
    headers = {"Retry-After": "1"} if status == 503 else None
    return _json({"detail": detail}, status, headers)


def validation_error(detail: list[dict[str, Any]]) -> Response:
    """FastAPI's list of errors for bad query values, as the one string every other error has."""
    parts = (f"{'.'.join(str(x) for x in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in detail)
    return error(422, "; ".join(parts))


def document(app: FastAPI) -> None:
    """Publish the schema with what is known once the artifacts are loaded: the largest `neighbors`, k."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        schema = default()  # built once, then cached by FastAPI
        pipeline: Pipeline | None = getattr(app.state, "pipeline", None)
        if pipeline is not None:
            for path in ("/classify", "/classify/batch"):
                for p in schema["paths"][path]["post"]["parameters"]:
                    if p["name"] == "neighbors":
                        p["schema"]["maximum"] = pipeline.k
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _answer(c: Classification, pipeline: Pipeline) -> dict[str, object]:
    return {
        "predictions": c.predictions,
        "neighbors": c.neighbors,
        "memory_version": c.memory_version,  # the version this answer came from, not the one served now
        "cached": c.cached,
        "timings_ms": c.timings_ms,
    }


def _check_options(pipeline: Pipeline, neighbors: int) -> None:
    if neighbors > pipeline.k:
        raise UploadError(422, f"neighbors={neighbors}, but the service retrieves k={pipeline.k}")


async def _classify(
    request: Request, pipeline: Pipeline, field: str, many: bool, top_k: int, neighbors: int
) -> list[Classification | DecodeError]:
    _check_options(pipeline, neighbors)
    s = pipeline.settings
    limit = s.max_request_bytes if many else s.max_image_bytes + 64 * 1024
    images = await read_images(request, field, limit, s.max_batch_images if many else 1)
    return await pipeline.classify(images, top_k, neighbors)


# ---------------------------------------------------------------- routes


@router.post("/classify", response_model=ClassifyResponse, responses=ERRORS, openapi_extra=_image_body("image", False))
async def classify(request: Request, pipeline: PipelineDep, top_k: TopK = 5, neighbors: Neighbors = 0) -> Response:
    """Classify one image: send it as multipart field `image` (or as a raw image/png|jpeg|webp body)."""
    (result,) = await _classify(request, pipeline, "image", False, top_k, neighbors)
    if isinstance(result, DecodeError):
        return error(result.status, result.message)
    return _json(_answer(result, pipeline))


@router.post(
    "/classify/batch", response_model=BatchResponse, responses=ERRORS, openapi_extra=_image_body("images", True)
)
async def classify_batch(
    request: Request, pipeline: PipelineDep, top_k: TopK = 5, neighbors: Neighbors = 0
) -> Response:
    """Classify several images, sent as repeated multipart field `images`; answers come in order, and a
    bad image fails only its own entry."""
    results = await _classify(request, pipeline, "images", True, top_k, neighbors)
    entries = [
        {"status": r.status, "detail": r.message}
        if isinstance(r, DecodeError)
        else {"status": 200, "result": _answer(r, pipeline)}
        for r in results
    ]
    return _json({"results": entries})


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(request: Request) -> Response:
    """Artifacts loaded, checked and warmed up: ready for traffic."""
    if getattr(request.app.state, "ready", False):
        return _json({"ready": True})
    return error(503, "not ready: loading or warming up")


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(m: MetricsDep) -> Response:
    """Prometheus exposition."""
    return Response(m.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/info", responses={503: {"model": ErrorResponse, "description": "not ready"}})
async def info(pipeline: PipelineDep) -> Response:
    """What is being served: encoder, memory, index, head, classes and the figures it was built with."""
    m, v = pipeline.manifest, pipeline.version.manifest
    follower = pipeline.follower.status() if pipeline.follower is not None else None
    return _json(
        {
            "encoder": m.encoder.model_dump() | {"providers": pipeline.encoder.providers},
            "memory": v.memory.model_dump()
            | {
                "version": v.memory_version,
                "parent_version": v.parent_version,
                "model_id": A.model_identity(m),
                "directory": str(pipeline.version.directory),
                "pid": os.getpid(),
                "follow": follower,
            },
            "index": m.index.model_dump(),
            "head": m.head.model_dump(),
            "classes": m.classes,
            "evaluation": v.evaluation,
            "cache": pipeline.cache.store.backend,
            "created": m.created,
            "supports": {
                "closed_set": True,
                "zero_shot": pipeline.zero_shot is not None and pipeline.zero_shot.missing(pipeline.version) is None,
            },
            "zero_shot": m.zero_shot.model_dump(exclude={"files"}) if m.zero_shot is not None else None,
        }
    )


@router.post("/admin/reload", include_in_schema=False)
async def admin_reload(request: Request, pipeline: PipelineDep) -> Response:
    """Look at the serving root's `current` link now (this process; the others within their poll
    interval). Bearer token RAC_ADMIN_TOKEN; off (404) when none is configured."""
    token = pipeline.settings.admin_token
    if not token:
        return error(404, "Not Found")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return _json({"detail": "a bearer token is required"}, 401, {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.encode(), token.encode()):
        return error(403, "wrong token")
    if pipeline.follower is None:
        return error(409, f"{pipeline.settings.artifacts} is a flat artifact directory, not a serving root")
    swapped = await pipeline.follower.check(retry=True)
    status = pipeline.follower.status()
    return _json({"memory_version": pipeline.memory_version, "swapped": swapped, **status})
