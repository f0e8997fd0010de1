"""The key check at the HTTP door (service/auth.py says who may call what): a plain ASGI wrapper in front of
every route, before a request's body is read. 401 without a known key, 403 for an admin route without an admin
key; the request's principal goes into its state for the routes that read a memory (they check that the key
reaches it); requests are counted per key name, never per key."""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.intake import header
from service.auth import OPEN, Keys, route_scope
from service.metrics import Metrics


class Authenticate:
    def __init__(self, app: ASGIApp, keys: Keys, metrics: Metrics):
        self.app, self.keys, self.metrics = app, keys, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        need = route_scope(scope["path"]) if self.keys.enabled else None
        if need is None:
            state["principal"] = OPEN
            await self.app(scope, receive, send)
            return
        given = header(scope, b"authorization")
        authorization = None if given is None else given.decode("latin-1")
        principal = self.keys.principal(authorization)
        if principal is None:
            why = "an API key is required: Authorization: Bearer KEY" if not authorization else "unknown API key"
            await _refuse(scope, send, 401, why, {"www-authenticate": "Bearer"})
            return
        self.metrics.key_requests.labels(principal.name).inc()
        if need == "admin" and principal.scope != "admin":
            await _refuse(scope, send, 403, f"key {principal.name!r} is not an admin key")
            return
        state["principal"] = principal
        await self.app(scope, receive, send)


async def _refuse(scope: Scope, send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    field = "error" if scope["path"].startswith("/v2") else "detail"  # the route's protocol, as every refusal
    body = orjson.dumps({field: message})
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
