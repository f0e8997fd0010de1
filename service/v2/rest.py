"""The Open Inference Protocol over HTTP: the /v2 routes, beside the service's own.

Requests come as JSON, where each IMAGE element is the base64 of an encoded image (images are not UTF-8 text,
which JSON strings must be), or with Triton's binary tensor data extension, what tritonclient sends by default:
the body's first `Inference-Header-Content-Length` bytes are the JSON header, and each input whose parameters
give `binary_data_size` takes that many bytes of what follows, in input order (a BYTES tensor as 4-byte
little-endian lengths, each followed by its element). Answers alike: an output asked for with parameter
`binary_data: true` (every output, with the request parameter `binary_data_output: true`) comes after the
JSON header instead of inside it. `Content-Encoding: gzip` or `deflate` bodies are read too. Refusals have the
protocol's shape, `{"error": "..."}` (the app's one error mapping, service/errors.py, says them so on /v2
routes). The checks and the pipeline call are service/v2/model.py's.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from service.api.intake import header
from service.api.upload import read_body
from service.auth import OPEN
from service.errors import Body, RequestError, json_answer
from service.v2 import model as v2
from service.v2.tensors import VERSION, InferRequest, InputTensor, parse_bytes

router = APIRouter(tags=["Open Inference Protocol (KServe v2)"])


class ProtocolError(BaseModel):
    error: str


class Readiness(BaseModel):
    ready: bool


_WHY = {
    400: "bad request: JSON, datatype, shape, parameters, or an image that does not decode (named)",
    401: "no known API key (where keys are configured)",
    403: "the key does not reach the memory named",
    404: "unknown model or version, or memory",
    413: "body or batch over the limit",
    415: "a content encoding the server does not read",
    503: "overloaded (Retry-After) or not ready",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The protocol's error answers, for the OpenAPI document."""
    return {c: {"model": ProtocolError, "description": _WHY[c]} for c in codes}


NOT_READY: dict[int | str, dict[str, Any]] = {400: {"model": Readiness, "description": "not ready (yet)"}}
HEADER_LENGTH = "Inference-Header-Content-Length"
HEADER_LENGTH_KEY = HEADER_LENGTH.lower().encode()  # as the request's headers name it


def _json(payload: object, status: int = 200) -> Response:
    return json_answer(orjson.dumps(payload), status)


# ---------------------------------------------------------------- health and metadata


@router.get("/v2")
async def server_metadata() -> Response:
    """Server name, version and the protocol extensions it supports."""
    return _json(v2.server_metadata())


@router.get("/v2/health/live")
async def server_live() -> Response:
    return _json({"live": True})


@router.get("/v2/health/ready", responses=NOT_READY)
async def server_ready(request: Request) -> Response:
    """200 once the model is loaded and warmed up; 400 before (the protocol's 4xx for false)."""
    ready = v2.ready(request.app.state)
    return _json({"ready": ready}, 200 if ready else 400)


@router.get("/v2/models/{model_name}", responses=_errors(404, 503))
@router.get("/v2/models/{model_name}/versions/{model_version}", responses=_errors(404, 503))
async def model_metadata(request: Request, model_name: str, model_version: str = "") -> Response:
    """The model's inputs and outputs: names, datatypes and shapes (-1: any size)."""
    v2.check_model(model_name, model_version, v2.loaded(request.app.state))
    pipeline = v2.require_pipeline(request.app.state)
    return _json(v2.model_metadata(pipeline, model_name))


@router.get("/v2/models/{model_name}/ready", responses=NOT_READY | _errors(404, 503))
@router.get("/v2/models/{model_name}/versions/{model_version}/ready", responses=NOT_READY | _errors(404, 503))
async def model_ready(request: Request, model_name: str, model_version: str = "") -> Response:
    v2.check_model(model_name, model_version, v2.loaded(request.app.state))
    ready = v2.ready(request.app.state)
    return _json({"name": model_name, "ready": ready}, 200 if ready else 400)


# ---------------------------------------------------------------- inference


INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "An inference request: JSON, or a JSON header of Inference-Header-Content-Length bytes "
        "followed by the tensors' binary data",
        "content": {
            "application/json": {
                "example": {
                    "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["<base64 of a PNG>"]}],
                    "parameters": {"top_k": 3, "neighbors": 3},
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


INFER_ERRORS = _errors(400, 401, 403, 404, 413, 415, 503)


@router.post("/v2/models/{model_name}/infer", openapi_extra=INFER_BODY, responses=INFER_ERRORS)
async def model_infer(request: Request, model_name: str) -> Response:
    """Classify the images of input IMAGE (BYTES [B]; model `rac-zero-shot`: among the labels of input LABELS,
    BYTES [L]); JSON or the binary tensor data extension."""
    return await model_version_infer(request, model_name, "")


@router.post("/v2/models/{model_name}/versions/{model_version}/infer", openapi_extra=INFER_BODY, responses=INFER_ERRORS)
async def model_version_infer(request: Request, model_name: str, model_version: str) -> Response:
    """As /v2/models/{model_name}/infer, for one version of the model (the one it has)."""
    v2.check_model(model_name, model_version, v2.loaded(request.app.state))
    pipeline = v2.require_pipeline(request.app.state)
    body = await _body(request, pipeline.settings.max_request_bytes)
    limits = v2.element_limits(pipeline.settings)
    length = header(request.scope, HEADER_LENGTH_KEY)
    req, binary = parse(body, None if length is None else length.decode("latin-1"), model_name, model_version, limits)
    outputs, first = await v2.infer(pipeline, req, getattr(request.state, "principal", OPEN))
    doc: dict[str, object] = {"model_name": req.model, "model_version": VERSION}
    if req.id:
        doc["id"] = req.id
    doc["parameters"] = {
        "memory": first.memory,
        "memory_version": first.memory_version,
        "neighbors_used": first.neighbors_used,
    }
    entries, blobs = [], []
    for out in outputs:
        entry: dict[str, object] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if binary(out.name):
            raw = out.raw()
            blobs.append(raw)
            entry["parameters"] = {"binary_data_size": len(raw)}
        else:
            entry["data"] = out.data()
        entries.append(entry)
    doc["outputs"] = entries
    head = orjson.dumps(doc)
    if not blobs:
        return Body(head)
    return Body(b"".join([head, *blobs]), 200, b"application/octet-stream", {HEADER_LENGTH: str(len(head))})


async def _body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) once it passes `limit` bytes, checked while reading; decompressed."""
    body = await read_body(request, limit)
    encoding = (header(request.scope, b"content-encoding") or b"identity").decode("latin-1").lower()
    if encoding == "identity":
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise RequestError(415, f"content encoding {encoding}: send gzip, deflate or an uncompressed body")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)  # never more than the limit in memory: no zip bombs
    except zlib.error as e:
        raise RequestError(400, f"corrupt {encoding} body: {e}") from None
    if len(out) > limit:
        raise RequestError(413, f"request body is over the limit of {limit} bytes once decompressed")
    if not inflater.eof:
        raise RequestError(400, f"truncated {encoding} body")
    return out


def parse(
    body: bytes, header_length: str | None, model: str, version: str, limits: dict[str, int]
) -> tuple[InferRequest, Callable[[str], bool]]:
    """A request body -> the request, and which outputs to answer in binary. A BYTES input holding more
    elements than `limits` gives its name (or the largest of them, for other names) is refused before they are
    all read."""
    view = memoryview(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise RequestError(400, f"{HEADER_LENGTH} is {header_length!r}; the body is {len(body)} bytes")
        split = int(header_length)
        header, binary = view[:split], view[split:]
    else:
        header, binary = view, view[:0]
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as e:
        raise RequestError(400, f"the inference request is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise RequestError(400, "the inference request must be a JSON object with a list of 'inputs'")
    inputs, used = [], 0
    for tensor in doc["inputs"]:
        if not isinstance(tensor, dict):
            raise RequestError(400, "each input must be a JSON object with name, datatype, shape and data")
        t, used = _input(tensor, binary, used, limits)
        inputs.append(t)
    if used != len(binary):
        raise RequestError(400, f"{len(binary) - used} bytes of binary data follow the header that no input claims")
    outputs = doc.get("outputs") or []
    parameters = doc.get("parameters") or {}
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and "name" in o and isinstance(o.get("parameters") or {}, dict) for o in outputs
    ):
        raise RequestError(400, "'outputs' must be a list of objects with a name (and parameters an object)")
    if not isinstance(parameters, dict):
        raise RequestError(400, "'parameters' must be a JSON object")
    default = parameters.get("binary_data_output") is True
    wanted = {str(o["name"]): (o.get("parameters") or {}).get("binary_data", default) is True for o in outputs}
    req = InferRequest(model, version, inputs, parameters, list(wanted), str(doc.get("id", "")))
    return req, lambda name: wanted.get(name, default)


def _input(tensor: dict[str, object], binary: memoryview, used: int, limits: dict[str, int]) -> tuple[InputTensor, int]:
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise RequestError(400, "each input needs a string 'name' and 'datatype'")
    limit = limits.get(name, max(limits.values()))
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise RequestError(400, f"input '{name}': 'shape' must be a list of integers, got {shape!r}")
    parameters = tensor.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or used + size > len(binary):
            raise RequestError(400, f"input '{name}': binary_data_size {size!r}; {len(binary) - used} bytes remain")
        raw = binary[used : used + size]
        elements = parse_bytes(raw, f"input '{name}'", limit) if datatype == "BYTES" else []
        return InputTensor(name, datatype, shape, elements), used + size
    if "data" not in tensor:
        raise RequestError(400, f"input '{name}' has neither 'data' nor a binary_data_size parameter")
    elements = _json_elements(name, tensor["data"], limit) if datatype == "BYTES" else []
    return InputTensor(name, datatype, shape, elements), used


def _json_elements(name: str, data: object, limit: int) -> list[bytes]:
    """JSON data of a BYTES input of shape [n]: a flat list of strings, the base64 of each image for IMAGE
    (images are not text), the text itself for other inputs (LABELS)."""
    if not isinstance(data, list):
        raise RequestError(400, f"input '{name}': 'data' must be a list of strings")
    if len(data) > limit:
        raise RequestError(400, f"input '{name}' holds {len(data)} elements; the limit is {limit}")
    if name != v2.IMAGE:
        if not all(isinstance(e, str) for e in data):
            raise RequestError(400, f"input '{name}': a BYTES element in JSON must be a string")
        return [e.encode() for e in data]
    out = []
    for i, element in enumerate(data):
        if not isinstance(element, str):
            raise RequestError(400, f"{name}[{i}]: a BYTES element in JSON must be a base64 string")
        try:
            out.append(base64.b64decode(element, validate=True))
        except (binascii.Error, ValueError):
            raise RequestError(400, f"{name}[{i}]: not base64 (in JSON, send each image as its base64)") from None
    return out
