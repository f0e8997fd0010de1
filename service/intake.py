"""The door for uploads: each request to a classify route is admitted or refused when it arrives, before its
body is read, so that a refusal costs microseconds (no read, no multipart parse) and a burst of uploads can
neither queue up without bound nor fill the memory.

A plain ASGI wrapper in front of the routes. It answers 413 when the declared body is over the route's limit
(after reading and discarding a body of up to DISCARD_BYTES: a client that sends its whole body before it
reads the answer, as Python's urllib does, gets the 413 instead of a connection reset), and 503 with
Retry-After when the process already holds as many uploads and images as RAC_MAX_PENDING or as many body
bytes as RAC_MAX_BODY_BYTES (service/batching.py's Admission decides).
"""

from __future__ import annotations

import orjson
from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.batching import Admission, Overloaded, Upload
from service.settings import Settings

UPLOADS = {"/classify": False, "/classify/batch": True}  # path -> many images
DISCARD_BYTES = 64 * 1024 * 1024  # an over-limit body up to this size is read (and dropped) before the 413


class Intake:
    def __init__(self, app: ASGIApp, settings: Settings, state: State):
        self.app, self.settings, self.state = app, settings, state  # state.pipeline: once loaded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        many = UPLOADS.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        pipeline = getattr(self.state, "pipeline", None)
        if many is None or pipeline is None:  # not an upload, or not loaded yet (the route answers 503)
            await self.app(scope, receive, send)
            return
        admission: Admission = pipeline.admission
        declared = content_length(scope)
        limit = self.settings.body_limit(many)
        if declared is not None and declared > limit:
            drained = declared <= DISCARD_BYTES and await discard(receive)
            detail = f"request body is {declared} bytes; the limit is {limit}"
            await respond(send, 413, detail, close=not drained)
            return
        try:
            upload = admission.upload(declared)
        except Overloaded as e:
            await respond(send, 503, f"overloaded, retry shortly: {e}", close=True)
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


def content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def discard(receive: Receive) -> bool:
    """Read the rest of the body and drop it; False when the client went away first."""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return False
        if not message.get("more_body", False):
            return True


async def respond(send: Send, status: int, detail: str, close: bool = False) -> None:
    body = orjson.dumps({"detail": detail})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    if close:  # the body was not read: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
