"""The plain routes and their short way in.

A plain route is one whose endpoint reads its Request itself, takes at most the path's parameters as
strings besides, and returns a Response (/classify, /classify/batch, /readyz, the page, the protocol's
readiness and inference): Starlette's own Route serves it, without FastAPI's work a request (solving
parameters, an exit stack, the response model a Response skips). FastAPI's routes stay behind them for the
OpenAPI document; errors go to the same handlers.

`Service` (FastAPI) also lets a request for a plain route skip the framework's own layers: its error page,
telemetry and body-limit middleware (telemetry is off, Intake bounds bodies), the exit stack (no plain route
opens a file) and the scan of the route list. Such a request goes through the service's own middleware
(RequestMetrics, Authenticate, Intake: every refusal counted as before), then its endpoint, found by method
and path in one dictionary lookup (a path with parameters: by its template, among the few such plain routes,
the first time, then by that match, kept) and called with the Request and the path's parameters: an exception
it raises goes to the app's handler for its class, as Starlette's route would send it (a RequestError mapped
as everywhere), without that route's two wrappers around every request and every message sent. An exception
nothing handles is answered 500 and logged by uvicorn, as the error page would. Every other request, and any
request under a root path, takes FastAPI's way.
"""

from __future__ import annotations

import inspect
import typing

from fastapi import APIRouter, FastAPI
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

MATCHED = 1024  # matches of paths with parameters kept (then forgotten all at once: any path may come)


class PlainRoute(Route):
    """A Starlette route that names itself in the request's scope, as FastAPI's routes do (RequestMetrics
    labels a request with its route's path template)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match != Match.NONE:
            child["route"] = self
        return match, child


def plain_routes(router: APIRouter) -> list[PlainRoute]:
    """The routes of `router` whose endpoint (a coroutine function) takes the Request and at most its path's
    parameters, each a str, and returns a Response, as PlainRoutes with the methods FastAPI's route has (python
    -m loadtests.protocols --hits times the difference)."""
    plain: list[PlainRoute] = []
    for route in router.routes:
        if not isinstance(route, APIRoute):
            continue
        d = route.dependant
        params = (d.query_params, d.header_params, d.cookie_params, d.body_params, d.dependencies)
        strings = all(p.field_info.annotation is str for p in d.path_params)
        returns = typing.get_type_hints(route.endpoint).get("return")
        plain_return = isinstance(returns, type) and issubclass(returns, Response)
        takes = d.request_param_name and strings and not any(params)
        if takes and plain_return and inspect.iscoroutinefunction(route.endpoint):
            methods = set(route.methods or ())
            served = PlainRoute(route.path, route.endpoint, methods=list(methods), name=route.name)
            served.methods = methods  # not the HEAD Starlette adds to a GET: the methods FastAPI's route has
            plain.append(served)
    return plain


class Service(FastAPI):
    """FastAPI with the short way in for its plain routes (the module says which layers it skips)."""

    def __init__(self, **kwargs: typing.Any) -> None:
        super().__init__(**kwargs)
        self.plain: dict[tuple[str, str], PlainRoute] = {}  # (method, path) -> route, for paths without parameters
        self.templated: list[PlainRoute] = []  # the others
        # (method, path) -> the route and path parameters of a path with parameters, as matched before
        self.matched: dict[tuple[str, str], tuple[PlainRoute, dict[str, typing.Any]]] = {}
        self._short: ASGIApp | None = None
        self._handlers: dict[type, typing.Any] = {}  # exception class -> the app's handler for it

    def serve_plainly(self, routes: list[PlainRoute]) -> None:
        """Serve `routes` before FastAPI's own (also in the route list, for anything that scans it)."""
        self.router.routes[:0] = routes
        self.plain |= {(method, r.path): r for r in routes if not r.param_convertors for method in r.methods or ()}
        self.templated += [r for r in routes if r.param_convertors]

    def _plain(self, scope: Scope) -> PlainRoute | None:
        """The plain route that serves a request, with the path's parameters put in its scope; None for none."""
        key = (scope["method"], scope["path"])
        route = self.plain.get(key)
        if route is not None:
            return route
        known = self.matched.get(key)  # a path with parameters seen before (clients send the same few)
        if known is not None:
            route, params = known
            scope.update(endpoint=route.endpoint, path_params=dict(params), route=route)
            return route
        for route in self.templated:
            match, child = route.matches(scope)  # Starlette's own matching: the method too, its path parameters
            if match == Match.FULL:
                if len(self.matched) >= MATCHED:
                    self.matched.clear()
                self.matched[key] = route, dict(child["path_params"])
                scope.update(child)
                return route
        return None

    def build_middleware_stack(self) -> ASGIApp:
        self._handlers = {k: v for k, v in self.exception_handlers.items() if isinstance(k, type)}
        short: ASGIApp = self._route
        for cls, args, kwargs in reversed(self.user_middleware):
            short = cls(short, *args, **kwargs)
        self._short = short
        return super().build_middleware_stack()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = None if scope["type"] != "http" or scope.get("root_path") or self.root_path else self._plain(scope)
        if route is None:
            await super().__call__(scope, receive, send)
            return
        if self.middleware_stack is None:
            self.middleware_stack = self.build_middleware_stack()
        assert self._short is not None
        scope["app"], scope["route"], scope["endpoint"] = self, route, route.endpoint
        scope.setdefault("router", self.router)
        await self._short(scope, receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        route: PlainRoute = scope["route"]
        request = Request(scope, receive, send)
        try:
            response = await route.endpoint(request, **scope.get("path_params", {}))
        except Exception as e:
            handler = next((self._handlers[c] for c in type(e).__mro__ if c in self._handlers), None)
            if handler is None:
                raise
            response = await handler(request, e)
        await response(scope, receive, send)
