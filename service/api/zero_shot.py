"""POST /classify/zero-shot: an image and candidate labels named in the request (RECO, service/core/zero_shot.py)."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel

from service.api.routes import ERRORS, ErrorResponse, FilterDep, MemoryDep, PipelineDep, json_response
from service.api.upload import read_form
from service.core.pipeline import Answer
from service.core.zero_shot import check_labels
from service.errors import RequestError

router = APIRouter()


class LabelProbability(BaseModel):
    label: str
    probability: float


class ZeroShotNeighbor(BaseModel):
    id: int
    key: str | None
    tags: list[str]
    text: str
    similarity: float  # cosine similarity of its image to the query


class ZeroShotResponse(BaseModel):
    predictions: list[LabelProbability]  # every label, most probable first
    neighbors: list[ZeroShotNeighbor]  # the memory items whose texts refined the image embedding
    neighbors_used: int  # neighbours searched: k, or fewer where fewer items pass the filter
    memory: str  # the named memory that answered
    memory_version: str
    template: str
    cached: dict[str, object]  # image: its neighbours came from the cache; labels: how many embeddings did
    timings_ms: dict[str, float]  # decode, queue, encode, search, fuse_image (batch stages), labels, score, total


_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "format": "binary", "minLength": 1},
                        "labels": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                        "template": {"type": "string", "description": "a prompt with '{}' for the label"},
                    },
                    "required": ["image", "labels"],
                }
            }
        },
    }
}

Neighbors = Annotated[int, Query(ge=0, le=1000, description="how many of the fused neighbours to return")]


@router.post(
    "/classify/zero-shot",
    response_model=ZeroShotResponse,
    responses={**ERRORS, 404: {"model": ErrorResponse, "description": "artifacts without zero-shot parts"}},
    openapi_extra=_FORM,
)
async def classify_zero_shot(
    request: Request, pipeline: PipelineDep, memory: MemoryDep, only: FilterDep, neighbors: Neighbors = 10
) -> Response:
    """Classify one image (multipart field `image`) among the labels given as repeated field `labels`."""
    if (why := pipeline.zero_shot_missing(memory)) is not None:
        raise RequestError(404, why)
    s = pipeline.settings
    parts = await read_form(request, s.zero_shot_body_bytes)
    images = [bytes(p.data) for p in parts if p.name == "image"]
    if len(images) != 1:
        raise RequestError(422, f"send exactly one file in form field 'image' ({len(images)} sent)")
    try:
        labels = [p.data.decode("utf-8") for p in parts if p.name == "labels"]
        templates = [p.data.decode("utf-8") for p in parts if p.name == "template"]
    except UnicodeDecodeError:
        raise RequestError(422, "labels and template must be UTF-8 text") from None
    template = templates[-1] if templates else s.zero_shot_template
    labels = check_labels(labels, template, s.zero_shot_max_labels, s.zero_shot_max_label_chars)
    result = await pipeline.zero_shot_classify(images, labels, template, neighbors, only, memory)
    (answer,) = result.answers
    if isinstance(answer, RequestError):
        raise answer
    return json_response(zero_shot_json(answer, labels, template, result.labels_cached))


def zero_shot_json(a: Answer, labels: list[str], template: str, labels_cached: int) -> dict[str, object]:
    order = np.argsort(-a.probs, kind="stable")
    n = a.neighbors
    return {
        "predictions": [{"label": labels[i], "probability": float(a.probs[i])} for i in order],
        "neighbors": [
            {"id": item.id, "key": item.key, "tags": list(item.tags), "text": item.text, "similarity": float(n.sims[j])}
            for j, item in enumerate(n.items)
        ],
        "neighbors_used": a.neighbors_used,
        "memory": a.memory,
        "memory_version": a.memory_version,
        "template": template,
        "cached": {"image": a.cached, "labels": labels_cached},
        "timings_ms": a.timings_ms,
    }
