"""create_app(settings) -> FastAPI. The lifespan loads and checks the artifacts once, then warms up.

python -m service                          # settings from RAC_* environment variables, RAC_WORKERS processes
uvicorn --factory service.app:factory      # the same app in one process
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import api, pages, v2_grpc, v2_rest, zeroshot_api
from service.artifacts import ArtifactError
from service.batching import Overloaded
from service.metrics import Metrics
from service.pipeline import Pipeline
from service.settings import Settings
from service.upload import UploadError

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
            route = scope.get("route")
            self.metrics.requests.labels(getattr(route, "path", "other"), str(status)).inc()


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            pipeline = await asyncio.to_thread(Pipeline, settings, metrics)
        except ArtifactError as e:
            log.error("refusing to start: %s", e)
            raise
        await pipeline.start()
        app.state.pipeline = pipeline
        grpc_server = await v2_grpc.start(app.state, settings, metrics)
        follower = pipeline.follower
        if follower is not None:  # SIGHUP: look at the serving root's `current` link now
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, follower.wake.set)
        warm = asyncio.create_task(_warm_up(app, pipeline))
        m = pipeline.manifest
        log.info(
            "serving %s: %d memory items (version %s), index %s, encoder on %s, cache %s",
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
            warm.cancel()
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
    app.add_middleware(RequestMetrics, metrics=metrics)

    async def upload_error(_: Request, e: Exception) -> Response:
        assert isinstance(e, UploadError)
        return api.error(e.status, e.message)

    async def overloaded(_: Request, e: Exception) -> Response:
        return api.error(503, f"overloaded, retry shortly: {e}")

    app.add_exception_handler(UploadError, upload_error)
    app.add_exception_handler(Overloaded, overloaded)
    return app


async def _warm_up(app: FastAPI, pipeline: Pipeline) -> None:
    await asyncio.to_thread(pipeline.warmup)
    app.state.ready = True
    log.info("warmed up: ready")


def factory() -> FastAPI:
    """For `uvicorn --factory service.app:factory`: settings from the environment."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return create_app(Settings())
