"""POST /classify/zero-shot: an image and candidate labels named in the request (RECO, service/zeroshot.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel

from service.api import ERRORS, ErrorResponse, PipelineDep, _json, error
from service.decode import DecodeError
from service.upload import UploadError, read_form
from service.zeroshot import LabelError, check_labels

router = APIRouter()

NOT_BUILT = (
    "these artifacts have no zero-shot parts: rebuild them with `rac build --zero-shot --out DIR` "
    "(`--quick` for a small one)"
)


class LabelProbability(BaseModel):
    label: str
    probability: float


class ZeroShotNeighbor(BaseModel):
    id: int
    text: str
    similarity: float  # cosine similarity of its image to the query


class ZeroShotResponse(BaseModel):
    predictions: list[LabelProbability]  # every label, most probable first
    neighbors: list[ZeroShotNeighbor]  # the memory items whose texts refined the image embedding
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
                        "image": {"type": "string", "format": "binary"},
                        "labels": {"type": "array", "items": {"type": "string"}},
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
async def classify_zero_shot(request: Request, pipeline: PipelineDep, neighbors: Neighbors = 10) -> Response:
    """Classify one image (multipart field `image`) among the labels given as repeated field `labels`."""
    zs = pipeline.zero_shot
    if zs is None:
        return error(404, NOT_BUILT)
    s = pipeline.settings
    limit = s.max_image_bytes + 64 * 1024 + s.zero_shot_max_labels * (4 * s.zero_shot_max_label_chars + 256)
    parts = await read_form(request, limit)
    images = [bytes(p.data) for p in parts if p.name == "image"]
    if len(images) != 1:
        raise UploadError(422, f"send exactly one file in form field 'image' ({len(images)} sent)")
    try:
        labels = [p.data.decode("utf-8") for p in parts if p.name == "labels"]
        templates = [p.data.decode("utf-8") for p in parts if p.name == "template"]
        template = templates[-1] if templates else s.zero_shot_template
        labels = check_labels(labels, template, s.zero_shot_max_labels, s.zero_shot_max_label_chars)
        answer = await zs.classify(images[0], labels, template, neighbors)
    except UnicodeDecodeError:
        return error(422, "labels and template must be UTF-8 text")
    except (LabelError, DecodeError) as e:
        return error(e.status, e.message)
    return _json(answer)
