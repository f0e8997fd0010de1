"""create_app(settings) -> FastAPI. The lifespan loads and checks the artifacts once, then warms up; a
failure of either stops the server process before it accepts a connection (uvicorn exits with status 3).

python -m service                          # settings from RAC_* environment variables, RAC_WORKERS processes
uvicorn --factory service.app:factory      # the same app in one process
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import pages, routes, schema
from service.api import zero_shot as zero_shot_routes
from service.api.intake import Intake, door
from service.api.keys import Authenticate
from service.api.parking import ADMISSION, PROBE, SPREAD, Probe
from service.api.plain import Service, plain_routes
from service.artifacts import ArtifactError
from service.auth import Keys
from service.core.batching import Admission
from service.core.pipeline import Pipeline
from service.errors import NOT_READY, RequestError, json_error
from service.memory.versions import OpenMemory, load_version
from service.metrics import Metrics
from service.settings import Settings
from service.spread import Spread, shared
from service.v2 import grpc as v2_grpc
from service.v2 import rest as v2_rest

log = logging.getLogger("service")
LOOPBACK = ("127.0.0.1", "::1", "localhost")
HEALTHY, READY = orjson.dumps({"status": "ok"}), orjson.dumps({"ready": True})
NOT_READY_BODY = orjson.dumps({"detail": NOT_READY})


class RequestMetrics:
    """Counts requests by route template and status (a plain ASGI wrapper: microseconds a request)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            if route is not None:
                path = route.path
            else:  # refused at the door, or not found
                upload = door(scope)
                path = upload.route if upload is not None else "other"
            self.metrics.requests.labels(path, str(status)).inc()


def create_app(
    settings: Settings,
    metrics_dir: str | None = None,
    open_memory: OpenMemory = load_version,
    supervisor: int | None = None,
) -> FastAPI:
    """metrics_dir: where every server process writes its metrics, when there are several; open_memory: how
    the pipeline opens its memory (service/cluster/app.py passes a sharded memory's opener); supervisor: the
    pid of the process that started this one and its siblings (service/serve.py), which passes a SIGHUP on
    to all of them."""
    metrics = Metrics(metrics_dir)
    keys = Keys(settings.api_keys, settings.admin_token, settings.api_keys_poll_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Admission | Probe | Spread | None]]:
        try:
            keys.load()
        except ValueError as e:
            log.error("refusing to start: %s", e)
            raise
        if not keys.enabled and settings.host not in LOOPBACK:
            log.warning(
                "no API keys (RAC_API_KEYS): anyone who reaches %s:%d can classify and read every memory item",
                settings.host,
                settings.port,
            )
        try:
            pipeline = await asyncio.to_thread(Pipeline, settings, metrics, open_memory)
        except ArtifactError as e:
            log.error("refusing to start: %s", e)
            raise
        await pipeline.start()
        try:
            await asyncio.to_thread(pipeline.warmup)
        except Exception:
            log.exception("refusing to start: the warm-up batch failed")
            await pipeline.stop()
            raise
        app.state.pipeline, app.state.ready = pipeline, True
        grpc_server = await v2_grpc.start(app.state, settings, metrics)
        followers = pipeline.memories.followers()

        def wake_followers() -> None:  # SIGHUP: look at every serving root's `current` link now
            if not followers:
                log.info("SIGHUP: every memory served is a flat artifact directory: nothing to reload")
            for f in followers:
                f.wake.set()

        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not in the main thread: none
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, wake_followers)
        _drain_on_sigterm(app, settings.drain_s)
        # Everything loaded so far (torch, onnxruntime, FastAPI, the artifacts: millions of objects) stays for the
        # life of the process: out of the collector's sight, a full collection no longer walks it. Under load
        # one came about every second and held the event loop for a tenth of a second or more.
        gc.freeze()
        gc.set_threshold(settings.gc_young_objects)  # the young generation's (Settings says why)
        collections = metrics.collections()
        gc.callbacks.append(collections)
        for served in pipeline.memories.served.values():
            log.info(
                "ready: memory %s from %s: %d items (version %s), index %s",
                served.name,
                served.path,
                served.version.memory.size,
                served.version.id,
                served.version.manifest.index.type,
            )
        log.info("encoder on %s, cache %s", pipeline.encoder.providers[0], pipeline.cache.store.backend)
        spread = shared(metrics.multiprocess_dir, "http")
        try:
            yield {ADMISSION: pipeline.admission, PROBE: probe, SPREAD: spread}  # for service/api/parking.py
        finally:
            gc.callbacks.remove(collections)
            app.state.ready = False
            if grpc_server is not None:
                await grpc_server.stop(grace=5)
            await pipeline.stop()
            if spread is not None:
                spread.close()
            metrics.process_exited()

    app = Service(
        # FastAPI's OpenTelemetry hooks look for a configured provider on every request: off (metrics are ours).
        telemetry={"tracing": False, "metrics": False, "logs": False},
        title="Retrieval-augmented image classification",
        description="Classifies an image after looking up its nearest neighbours in a memory of image-text pairs.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings, app.state.metrics, app.state.ready = settings, metrics, False
    app.state.keys = keys

    def probe(path: str) -> tuple[int, bytes] | None:
        """GET /healthz and /readyz as their routes answer them (service/api/routes.py), for the HTTP protocol
        to answer before any request task; None for any other path."""
        if path == "/healthz":
            status, body = 200, HEALTHY
        elif path == "/readyz":
            status, body = (200, READY) if app.state.ready else (503, NOT_READY_BODY)
        else:
            return None
        metrics.requests.labels(path, str(status)).inc()
        return status, body

    app.state.reload_all = functools.partial(_reload_all, supervisor)
    routers = (routes.router, zero_shot_routes.router, v2_rest.router, pages.router)
    for router in routers:
        app.include_router(router)
    app.serve_plainly([r for router in routers for r in plain_routes(router)])
    schema.document(app)
    app.add_middleware(Intake, settings=settings, state=app.state)
    app.add_middleware(Authenticate, keys=keys, metrics=metrics)  # before the upload door: no key, no admission
    app.add_middleware(RequestMetrics, metrics=metrics)  # added last: outermost, so it counts refusals too

    async def refused(request: Request, e: Exception) -> Response:
        """The one error mapping: every refusal (bad input, overload, a shard down) in the shape of the
        route's protocol: the Open Inference Protocol's {"error"} under /v2, {"detail"} elsewhere."""
        assert isinstance(e, RequestError)
        return json_error(e.status, e.message, _error_field(request))

    async def bad_query(request: Request, e: Exception) -> Response:
        assert isinstance(e, RequestValidationError)
        return json_error(422, routes.validation_message(list(e.errors())), _error_field(request))

    app.add_exception_handler(RequestValidationError, bad_query)
    app.add_exception_handler(RequestError, refused)
    return app


def _error_field(request: Request) -> str:
    return "error" if request.url.path.startswith("/v2") else "detail"


def _reload_all(supervisor: int | None) -> bool:
    """Ask every server process of this server to look at the memory root now (POST /admin/reload): a SIGHUP to
    their supervisor, which passes it on. False where this process is the only one."""
    if supervisor is None:
        return False
    os.kill(supervisor, signal.SIGHUP)
    return True


def _drain_on_sigterm(app: FastAPI, seconds: float) -> None:
    """On SIGTERM: /readyz answers 503 at once and requests are still served for `seconds` (a load balancer's
    time to stop sending), then uvicorn's own SIGTERM handling runs: stop accepting, let the requests in
    flight finish, shut down. A second SIGTERM skips the wait."""
    if threading.current_thread() is not threading.main_thread():
        return  # not under uvicorn's signal handling (an in-process test client)
    stop = signal.getsignal(signal.SIGTERM)
    if not callable(stop):
        return

    def drain(sig: int, frame: FrameType | None) -> None:
        if not app.state.ready:
            stop(sig, frame)
            return
        app.state.ready = False
        log.info("SIGTERM: not ready; stopping in %.1f s, once the requests in flight are answered", seconds)
        timer = threading.Timer(seconds, stop, (sig, frame))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, drain)


def factory() -> FastAPI:
    """For `uvicorn --factory service.app:factory`: settings from the environment."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return create_app(Settings())
