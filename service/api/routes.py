"""HTTP routes and their schemas. No numeric work here: parse, call the pipeline, serialise."""

from __future__ import annotations

import os
import re
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel
from starlette.datastructures import QueryParams

from service.api.upload import read_images
from service.artifacts import model_identity
from service.auth import OPEN, Keys, Principal
from service.core.pipeline import NO_FILTER, Answer, Pipeline
from service.errors import NOT_READY, RequestError, json_answer, json_error
from service.memory.filters import Filter
from service.metrics import Metrics

router = APIRouter()


# ---------------------------------------------------------------- schemas (for the OpenAPI page)


class Prediction(BaseModel):
    label: str
    index: int
    probability: float


class Neighbor(BaseModel):
    id: int  # the item's stable id: the same item in every memory version that holds it
    key: str | None  # the user's own key for the item, where it has one
    tags: list[str]
    text: str
    source: str  # "downstream" (the training set) or "external"
    label: str  # the class the item's text names
    similarity: float  # cosine similarity of its image to the query
    attention: float  # the head's last-layer attention weight on it


class ClassifyResponse(BaseModel):
    predictions: list[Prediction]
    neighbors: list[Neighbor]
    neighbors_used: int  # how many neighbours the head read: k, or fewer where fewer items pass the filter
    memory: str  # the named memory that answered
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


# The query of the classify routes: name -> (minimum, maximum or None, default, description). Read by _options,
# not declared as FastAPI parameters: on the routes every upload takes, FastAPI's parameter and dependency
# machinery cost a third of the request's own CPU (measured in-process, routing to answer).
OPTIONS: dict[str, tuple[int, int | None, int, str]] = {
    "top_k": (1, 1000, 5, "how many classes to return (at most all of them)"),
    "neighbors": (
        0,
        None,
        0,
        "how many retrieved memory items to return (at most k)",
    ),  # max: k (schema.py)
}
INTEGER = re.compile(r"-?[0-9]+")
# What a request without a query string reads (most do): no lookups, each of which would raise a KeyError inside.
DEFAULT_OPTIONS = {name: default for name, (_, _, default, _) in OPTIONS.items()}
MEMORY_TEXT = "the named memory (one of /info's `memories`); unset: the server's default"
FILTER_TEXT = {
    "source": "search only items of any of these sources",
    "tag": "search only items carrying any of these tags",
    "exclude_key": "never return the items with these keys",
}


def _image_body(field: str, many: bool) -> dict[str, object]:
    # An empty image is refused (400); in a batch it fails its own entry only (the request is answered 200).
    file = {"type": "string", "format": "binary"} | ({} if many else {"minLength": 1})
    prop = {"type": "array", "items": file, "minItems": 1} if many else file
    form = {"type": "object", "properties": {field: prop}, "required": [field]}
    parameters = [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": text,
            "schema": {"type": "integer", "minimum": low, "default": default} | ({"maximum": high} if high else {}),
        }
        for name, (low, high, default, text) in OPTIONS.items()
    ]
    parameters.append({"name": "memory", "in": "query", "required": False, "schema": {"type": "string"}})
    parameters[-1]["description"] = MEMORY_TEXT
    for name, text in FILTER_TEXT.items():  # repeated: source=a&source=b lets either through
        schema = {"type": "array", "items": {"type": "string"}}
        parameters.append({"name": name, "in": "query", "required": False, "description": text, "schema": schema})
    return {
        "parameters": parameters,
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": form}, "image/png": {"schema": file}},
        },
    }


ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "empty, truncated or corrupt image"),
        (413, "body, image or pixel count over the limit"),
        (415, "not multipart/form-data, or not a PNG, JPEG or WebP image"),
        (401, "no known API key (where keys are configured: Authorization: Bearer KEY)"),
        (403, "the key does not reach this memory, or is not an admin key"),
        (404, "no such memory (the message names the ones there are)"),
        (422, "bad query values, no image field, or a filter naming a source or tag the memory does not have"),
        (503, "overloaded (Retry-After) or not ready"),
    )
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: ERRORS[c] for c in codes}


# ---------------------------------------------------------------- dependencies


# Dependencies are async: FastAPI runs plain `def` ones in a worker thread, a thread hop per request.
async def get_pipeline(request: Request) -> Pipeline:
    pipeline: Pipeline | None = getattr(request.app.state, "pipeline", None)
    if pipeline is None:
        raise RequestError(503, NOT_READY)
    return pipeline


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


async def get_filter(
    source: Annotated[list[str] | None, Query(description=FILTER_TEXT["source"])] = None,
    tag: Annotated[list[str] | None, Query(description=FILTER_TEXT["tag"])] = None,
    exclude_key: Annotated[list[str] | None, Query(description=FILTER_TEXT["exclude_key"])] = None,
) -> Filter:
    """The request's filter: repeated query parameters (source=a&source=b: either)."""
    return Filter.of(source, tag, exclude_key)


FilterDep = Annotated[Filter, Depends(get_filter)]
MemoryName = Annotated[str | None, Query(description=MEMORY_TEXT)]


async def get_principal(request: Request) -> Principal:
    """Who the request comes from (service/api/keys.py put it in the request's state; OPEN where no keys are
    configured)."""
    principal: Principal = request.scope.get("state", {}).get("principal", OPEN)
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def get_memory(pipeline: PipelineDep, principal: PrincipalDep, memory: MemoryName = None) -> str:
    """The named memory a request reads (the default where it names none), one its key reaches."""
    return pipeline.memories.reachable(memory, principal)


MemoryDep = Annotated[str, Depends(get_memory)]


def json_response(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return json_answer(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), status, headers)


def validation_message(detail: list[dict[str, Any]]) -> str:
    """FastAPI's list of errors for bad query values, as the one string every other error has."""
    return "; ".join(f"{'.'.join(str(x) for x in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in detail)


def answer_json(a: Answer, classes: list[str], top_k: int) -> dict[str, object]:
    """An answer as /classify says it: the top classes, the neighbours described, where it came from."""
    probs = a.probs.tolist()  # a few classes: Python's sort costs less than numpy's call (ties: by index)
    order = sorted(range(len(probs)), key=probs.__getitem__, reverse=True)[:top_k]
    n = a.neighbors
    return {
        "predictions": [{"label": classes[c], "index": c, "probability": probs[c]} for c in order],
        "neighbors": [
            {
                "id": item.id,
                "key": item.key,
                "tags": list(item.tags),
                "text": item.text,
                "source": item.source,
                "label": classes[item.label],
                "similarity": float(n.sims[j]),
                "attention": float(n.attention[j]),
            }
            for j, item in enumerate(n.items)
        ],
        "neighbors_used": a.neighbors_used,
        "memory": a.memory,
        "memory_version": a.memory_version,  # the version this answer came from, not the one served now
        "cached": a.cached,
        "timings_ms": a.timings_ms,
    }


def _options(query: QueryParams, pipeline: Pipeline) -> dict[str, int]:
    """top_k and neighbors from the query, checked as the schema says (422 naming the parameter)."""
    out = {}
    for name, (low, high, default, _) in OPTIONS.items():
        given = query.get(name)
        if given is None:
            out[name] = default
            continue
        if not INTEGER.fullmatch(given):
            raise RequestError(422, f"{name}: not an integer: {given!r}")
        value = int(given)
        if value < low or (high is not None and value > high):
            raise RequestError(422, f"{name}: {value} is outside {low}..{high if high is not None else ''}")
        out[name] = value
    if out["neighbors"] > pipeline.k:
        raise RequestError(422, f"neighbors={out['neighbors']}, but the service retrieves k={pipeline.k}")
    return out


async def _classify(request: Request, field: str, many: bool) -> tuple[Pipeline, int, list[Answer | RequestError]]:
    """The classify routes' work, their query read here rather than by FastAPI's parameter machinery (see
    OPTIONS): the pipeline, top_k, and each image's answer or refusal."""
    pipeline = await get_pipeline(request)
    q = request.query_params if request.scope["query_string"] else None
    options = _options(q, pipeline) if q else DEFAULT_OPTIONS
    memory = await get_memory(pipeline, await get_principal(request), q.get("memory") if q else None)
    only = Filter.of(q.getlist("source"), q.getlist("tag"), q.getlist("exclude_key")) if q else NO_FILTER
    s = pipeline.settings
    images = await read_images(request, field, s.body_limit(many), s.max_batch_images if many else 1)
    return pipeline, options["top_k"], await pipeline.classify(images, options["neighbors"], only, memory)


# ---------------------------------------------------------------- routes


@router.post("/classify", response_model=ClassifyResponse, responses=ERRORS, openapi_extra=_image_body("image", False))
async def classify(request: Request) -> Response:
    """Classify one image: send it as multipart field `image` (or as a raw image/png|jpeg|webp body).
    `source`, `tag` and `exclude_key` restrict the search to the items they let through."""
    pipeline, top_k, (result,) = await _classify(request, "image", False)
    if isinstance(result, RequestError):
        raise result
    return json_response(answer_json(result, pipeline.manifest.classes, top_k))


@router.post(
    "/classify/batch", response_model=BatchResponse, responses=ERRORS, openapi_extra=_image_body("images", True)
)
async def classify_batch(request: Request) -> Response:
    """Classify several images, sent as repeated multipart field `images`; answers come in order, and a
    bad image fails only its own entry."""
    pipeline, top_k, results = await _classify(request, "images", True)
    classes = pipeline.manifest.classes
    entries = [
        {"status": r.status, "detail": r.message}
        if isinstance(r, RequestError)
        else {"status": 200, "result": answer_json(r, classes, top_k)}
        for r in results
    ]
    return json_response({"results": entries})


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(request: Request) -> Response:
    """Artifacts loaded, checked and warmed up: ready for traffic."""
    if getattr(request.app.state, "ready", False):
        return json_response({"ready": True})
    return json_error(503, NOT_READY)


@router.get("/metrics", response_class=PlainTextResponse, responses=_errors(401, 403))
async def metrics(m: MetricsDep) -> Response:
    """Prometheus exposition."""
    return Response(m.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get(
    "/info",
    responses=_errors(401, 403, 404) | {503: {"model": ErrorResponse, "description": "not ready"}},
)
async def info(pipeline: PipelineDep, memory: MemoryDep, principal: PrincipalDep) -> Response:
    """What is being served: encoder, the memory (the default, or `memory`), index, head, classes and the
    figures it was built with, and every named memory with its version."""
    m = pipeline.manifest
    served = pipeline.memories.get(memory)
    with served.holding() as version:
        v = version.manifest
        follower = served.follower.status() if served.follower is not None else None
        body = {
            "encoder": m.encoder.model_dump() | {"providers": pipeline.encoder.providers} | m.encoder.roles(),
            "memory": v.memory.model_dump(exclude={"tags"})
            | {
                "name": served.name,
                "tags": len(version.memory.filters.tags),
                "version": v.memory_version,
                "parent_version": v.parent_version,
                "model_id": model_identity(m),
                "directory": str(version.directory),
                "pid": os.getpid(),
                "follow": follower,
            },
            "memories": {
                name: {
                    "version": s.version.id,
                    "size": s.version.memory.size,
                    "default": name == pipeline.memories.default,
                }
                for name, s in pipeline.memories.served.items()
                if principal.reaches(name)  # a key learns only the memories it reaches
            },
            "index": m.index.model_dump(),
            "head": m.head.model_dump(),
            "classes": m.classes,
            "evaluation": v.evaluation,
            "cache": pipeline.cache.store.backend,
            "created": m.created,
            "supports": {
                "closed_set": True,
                "zero_shot": pipeline.zero_shot is not None and pipeline.zero_shot.missing(version) is None,
            },
            "zero_shot": m.zero_shot.model_dump(exclude={"files"}) if m.zero_shot is not None else None,
        }
    return json_response(body)


@router.post("/admin/reload", include_in_schema=False)
async def admin_reload(request: Request, pipeline: PipelineDep) -> Response:
    """Look at every serving root's `current` link now: this process, and every other process of the server
    (through their supervisor) a moment later. An admin key (RAC_API_KEYS), or the bearer token
    RAC_ADMIN_TOKEN; off (404) when neither is configured."""
    keys: Keys = request.app.state.keys
    if not keys.enabled:  # no keys file: the admin token alone guards this route (the middleware let it through)
        if not pipeline.settings.admin_token:
            return json_error(404, "Not Found")
        authorization = request.headers.get("authorization")
        if not authorization or not authorization.lower().startswith("bearer "):
            return json_response({"detail": "a bearer token is required"}, 401, {"WWW-Authenticate": "Bearer"})
        if keys.admin(authorization) is None:
            return json_error(403, "wrong token")
    followers = pipeline.memories.followers()
    if not followers:
        return json_error(409, "every memory served is a flat artifact directory, not a serving root")
    reloaded = {}
    for f in followers:
        swapped = await f.check(retry=True)
        reloaded[f.name] = {
            "memory_version": pipeline.memories.get(f.name).version.id,
            "swapped": swapped,
            **f.status(),
        }
    others = request.app.state.reload_all()  # the other server processes look now too
    default = reloaded.get(pipeline.memories.default, next(iter(reloaded.values())))
    return json_response({**default, "all_processes": others, "memories": reloaded})
