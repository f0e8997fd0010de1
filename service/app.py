"""create_app(settings) -> FastAPI. The lifespan loads and checks the artifacts once, then warms up; a
failure of either stops the server process before it accepts a connection (uvicorn exits with status 3).

python -m service                          # settings from RAC_* environment variables, RAC_WORKERS processes
uvicorn --factory service.app:factory      # the same app in one process
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import api, pages, v2_grpc, v2_rest, zeroshot_api
from service.artifacts import ArtifactError
from service.batching import Overloaded
from service.intake import UPLOADS, Intake
from service.metrics import Metrics
from service.pipeline import Pipeline
from service.settings import Settings
from service.shards import ShardsUnavailable
from service.upload import UploadError
from service.versions import OpenMemory, load_version

log = logging.getLogger("service")


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
            path = scope["path"] if scope["path"] in UPLOADS else "other"  # refused at the door: no route yet
            self.metrics.requests.labels(getattr(scope.get("route"), "path", path), str(status)).inc()


def create_app(settings: Settings, metrics_dir: str | None = None, open_memory: OpenMemory = load_version) -> FastAPI:
    """metrics_dir: where every server process writes its metrics, when there are several; open_memory: how
    the pipeline opens its memory (service/ray_app.py passes a sharded memory's opener)."""
    metrics = Metrics(metrics_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
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
        follower = pipeline.follower
        if follower is not None:  # SIGHUP: look at the serving root's `current` link now
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, follower.wake.set)
        _drain_on_sigterm(app, settings.drain_s)
        m = pipeline.manifest
        log.info(
            "ready: serving %s: %d memory items (version %s), index %s, encoder on %s, cache %s",
            settings.artifacts,
            m.memory.size,
            pipeline.memory_version,
            m.index.type,
            pipeline.encoder.providers[0],
            pipeline.cache.store.backend,
        )
        try:
            yield
        finally:
            app.state.ready = False
            if grpc_server is not None:
                await grpc_server.stop(grace=5)
            await pipeline.stop()
            metrics.process_exited()

    app = FastAPI(
        title="Retrieval-augmented image classification",
        description="Classifies an image after looking up its nearest neighbours in a memory of image-text pairs.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings, app.state.metrics, app.state.ready = settings, metrics, False
    app.include_router(api.router)
    app.include_router(zeroshot_api.router)
    app.include_router(v2_rest.router)
    app.include_router(pages.router)
    api.document(app)
    app.add_middleware(Intake, settings=settings, state=app.state)
    app.add_middleware(RequestMetrics, metrics=metrics)  # added last: outermost, so it counts refusals too

    async def upload_error(_: Request, e: Exception) -> Response:
        assert isinstance(e, UploadError)
        return api.error(e.status, e.message)

    async def overloaded(_: Request, e: Exception) -> Response:
        return api.error(503, f"overloaded, retry shortly: {e}")

    async def shards_unavailable(_: Request, e: Exception) -> Response:
        return api.error(503, f"a memory shard is unavailable, retry shortly: {e}")

    async def bad_query(_: Request, e: Exception) -> Response:
        assert isinstance(e, RequestValidationError)
        return api.validation_error(list(e.errors()))

    app.add_exception_handler(RequestValidationError, bad_query)
    app.add_exception_handler(UploadError, upload_error)
    app.add_exception_handler(Overloaded, overloaded)
    app.add_exception_handler(ShardsUnavailable, shards_unavailable)  # a sharded memory (service/ray_app.py)
    return app


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
