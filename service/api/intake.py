"""The door for uploads: every HTTP route that takes one (/classify, /classify/batch, /classify/zero-shot and
the Open Inference Protocol's infer routes) is admitted, made to wait or refused when the request arrives,
before its body is read, so that a burst of uploads can neither queue up without bound nor fill the memory,
and a refusal costs microseconds (no read, no parse). gRPC's ModelInfer goes through the same Admission in
service/v2/grpc.py.

A plain ASGI wrapper in front of the routes. It answers 413 when the declared body is over the route's limit
(after reading and discarding a body of up to DISCARD_BYTES: a client that sends its whole body before it
reads the answer, as Python's urllib does, gets the 413 instead of a connection reset). Past RAC_MAX_PENDING
uploads and images a request waits for a slot for at most RAC_MAX_QUEUE_S, its body unread; it is refused
with 503 and Retry-After past that, with RAC_MAX_WAITING requests already waiting, or with RAC_MAX_BODY_BYTES
of bodies held (service/core/batching.py's Admission decides), its body still unread: a small one is dropped
as it comes and the connection kept, a bigger one never read and the connection closed. Errors have the
route's own shape: {"detail": ...}, or {"error": ...} on the Open Inference Protocol's routes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import orjson
from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.batching import Admission, Upload
from service.errors import Overloaded
from service.settings import Settings

DISCARD_BYTES = 64 * 1024 * 1024  # an over-limit body up to this size is read (and dropped) before the 413
# A request refused for load whose body is at most this keeps its connection: uvicorn reads the body and drops
# it (cheaper than a new connection), and the client's retry is parked (service/api/parking.py) until there is
# room, instead of coming straight back on a new connection to be refused again. A bigger body is not read.
KEEP_ALIVE_BYTES = 64 * 1024
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Door:
    route: str  # the route's path template (a metrics label: never a path as sent)
    limit: Callable[[Settings], int]  # the route's body limit in bytes
    error: str  # the key its error answers put the message under


UPLOADS = {
    "/classify": Door("/classify", lambda s: s.body_limit(False), "detail"),
    "/classify/batch": Door("/classify/batch", lambda s: s.body_limit(True), "detail"),
    "/classify/zero-shot": Door("/classify/zero-shot", lambda s: s.zero_shot_body_bytes, "detail"),
}
V2_INFER = re.compile(r"/v2/models/[^/]+(/versions/[^/]+)?/infer")
V2_DOORS = (
    Door("/v2/models/{model_name}/infer", lambda s: s.max_request_bytes, "error"),
    Door("/v2/models/{model_name}/versions/{model_version}/infer", lambda s: s.max_request_bytes, "error"),
)


def door(scope: Mapping[str, object]) -> Door | None:
    """The door of an upload route; None for any other request."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    path = scope["path"]
    assert isinstance(path, str)
    if (upload := UPLOADS.get(path)) is not None:
        return upload
    v2 = V2_INFER.fullmatch(path)
    return None if v2 is None else V2_DOORS[v2.group(1) is not None]


class Intake:
    def __init__(self, app: ASGIApp, settings: Settings, state: State):
        self.app, self.settings, self.state = app, settings, state  # state.pipeline: once loaded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = door(scope)
        pipeline = getattr(self.state, "pipeline", None)
        if route is None or pipeline is None:  # not an upload, or not loaded yet (the route answers 503)
            await self.app(scope, receive, send)
            return
        admission: Admission = pipeline.admission
        declared = content_length(scope)
        limit = route.limit(self.settings)
        if declared is not None and declared > limit:
            drained = declared <= DISCARD_BYTES and await discard(receive)
            detail = f"request body is {declared} bytes; the limit is {limit}"
            await respond(send, 413, route.error, detail, close=not drained)
            return
        try:
            upload = await admission.upload(declared)
        except Overloaded as e:
            # A client that waits for "100 Continue" may never send the body: its connection cannot go on.
            small = declared is not None and declared <= KEEP_ALIVE_BYTES and not expects_continue(scope)
            await respond(send, 503, route.error, f"overloaded, retry shortly: {e}", close=not small)
            return
        try:
            await self.app(scope, _counting(receive, upload, count=declared is None), send)
        finally:
            upload.close()


def _counting(receive: Receive, upload: Upload, count: bool) -> Receive:
    """receive(), telling the upload when its body has arrived, and counting the bytes of a body without a
    Content-Length as they come (Overloaded past the process's byte limit)."""

    async def wrapped() -> Message:
        message = await receive()
        if message["type"] == "http.request":
            if count:
                upload.received(len(message.get("body", b"")))
            if not message.get("more_body", False):
                upload.arrived()
        else:  # http.disconnect
            upload.arrived()
        return message

    return wrapped


def expects_continue(scope: Scope) -> bool:
    return any(name == b"expect" and value.lower() == b"100-continue" for name, value in scope["headers"])


def header(scope: Scope, name: bytes) -> bytes | None:
    """A request header's value as it came (`name` in lower case; the first, as Starlette's Headers.get() reads
    it), from a dictionary built in C: Headers decodes and compares every header anew at each lookup."""
    return dict(reversed(scope["headers"])).get(name)  # reversed: the first wins


def content_length(scope: Scope) -> int | None:
    """The declared body length; None for none (or one that is not a number)."""
    value = header(scope, b"content-length")
    return int(value) if value is not None and value.isdigit() else None


async def discard(receive: Receive) -> bool:
    """Read the rest of the body and drop it; False when the client went away first."""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return False
        if not message.get("more_body", False):
            return True


async def respond(send: Send, status: int, key: str, message: str, close: bool = False) -> None:
    body = orjson.dumps({key: message})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
