"""One refusal type for every front-end, and how each wire format says it.

A `RequestError` carries the HTTP status and a message for the client. The pipeline, the upload reader and
the protocol checks raise it; REST answers `{"detail": message}`, the Open Inference Protocol over HTTP
`{"error": message}`, and over gRPC the status code the HTTP status maps to. A 503 always says when to retry.
"""

from __future__ import annotations

import grpc
import orjson
from fastapi.responses import Response

RETRY_AFTER = {"Retry-After": "1"}

GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


class RequestError(Exception):
    """A request the service refuses: `status` is the HTTP status, `message` says why, for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Overloaded(RequestError):
    """More work is pending than the server admits: 503 with Retry-After, decided before the work is done."""

    def __init__(self, why: str):
        super().__init__(503, f"overloaded, retry shortly: {why}")


class Unavailable(RequestError):
    """A dependency the answer needs (a memory shard) does not answer: 503, never a 500."""

    def __init__(self, why: str):
        super().__init__(503, why)


NOT_READY = "not ready: loading or warming up"  # /readyz and every route while loading


def json_error(status: int, message: str, field: str = "detail") -> Response:
    """The refusal as JSON: `{"detail": ...}` for the service's routes, `{"error": ...}` (field="error") for
    the Open Inference Protocol's."""
    return json_answer(orjson.dumps({field: message}), status, RETRY_AFTER if status == 503 else None)


def json_answer(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON answer already serialized."""
    return Body(body, status, b"application/json", headers)


class Body(Response):
    """An answer already serialized, its headers set directly: its length, its type and any other given.
    Starlette's Response works them out from its media type and body at every answer."""

    def __init__(
        self,
        body: bytes,
        status_code: int = 200,
        media_type: bytes = b"application/json",
        headers: dict[str, str] | None = None,
    ) -> None:  # what Response.__init__ sets, no more
        self.body, self.status_code, self.background = body, status_code, None
        self.media_type = media_type.decode("latin-1")
        self.raw_headers = [(b"content-length", b"%d" % len(body)), (b"content-type", media_type)]
        if headers:
            self.raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


def grpc_code(status: int) -> grpc.StatusCode:
    return GRPC_CODES.get(status, grpc.StatusCode.INTERNAL if status >= 500 else grpc.StatusCode.INVALID_ARGUMENT)
