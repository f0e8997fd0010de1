"""serve(settings): the artifact directory over HTTP with uvicorn, as many processes as the settings say.

The settings (read once from RAC_* variables by the caller: `python -m service`, `rac serve`) are handed to
every server process as a Settings object, never through the environment. With several processes, each
loads the artifacts itself (the index and the value store are memory-mapped, so their pages are shared) and
the Prometheus metrics are summed across processes through files in a fresh directory made here for each
run and removed after it, so that no earlier run's counts are ever added in.

A process that refuses to start (artifacts that do not fit, a failed warm-up) makes the whole server exit
with a non-zero status, with one process or several, so that systemd, Docker and Kubernetes see it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import TYPE_CHECKING

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from service.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

# prometheus_client decides, when it is imported, whether values live in files; it reads this variable for
# that, in each server process: the one environment variable set here, before any server process starts.
METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


class AppFactory:
    """Builds the app in a server process from the settings it was bound to. Picklable: uvicorn's process
    launcher sends it to every process it starts (so no setting travels through the environment)."""

    def __init__(self, settings: Settings, metrics_dir: str | None = None):
        self.settings, self.metrics_dir = settings, metrics_dir

    def __call__(self) -> FastAPI:
        from service.app import create_app  # the heavy imports happen in the server processes only

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        return create_app(self.settings, self.metrics_dir)


def serve(settings: Settings) -> int:
    """Serve until stopped. Returns the exit status: 3 (uvicorn's startup failure) when a process refused to
    start, else 0."""
    workers = settings.processes
    settings = settings.model_copy(update={"workers": workers})  # each process sizes its encoder threads by it
    if workers == 1:
        os.environ.pop(METRICS_DIR_VARIABLE, None)
        server = uvicorn.Server(_config(AppFactory(settings), 1))
        server.run()  # a refusal raises SystemExit(3) out of here
        return 0 if server.started else STARTUP_FAILURE
    metrics_dir = os.environ[METRICS_DIR_VARIABLE] = tempfile.mkdtemp(prefix="rac-metrics-")
    try:
        config = _config(AppFactory(settings, metrics_dir), workers)
        supervisor = Multiprocess(config, sockets=[config.bind_socket()])
        supervisor.run()  # returns, status unsaid, once a process failed to start or a signal came
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        os.environ.pop(METRICS_DIR_VARIABLE, None)
    failed = [p.pid for p in supervisor.processes if p.exitcode == STARTUP_FAILURE]
    if failed:
        logging.getLogger("uvicorn.error").error("server process %s refused to start: exiting", failed[0])
        return STARTUP_FAILURE
    return 0


def _config(factory: AppFactory, workers: int) -> uvicorn.Config:
    s = factory.settings
    return uvicorn.Config(
        factory,
        factory=True,
        host=s.host,
        port=s.port,
        workers=workers,
        backlog=s.backlog,
        access_log=False,
        timeout_graceful_shutdown=int(s.shutdown_timeout_s),
        # The launcher kills a process that does not answer its ping in time and starts another: 5 s (the
        # default) is shorter than a start-up on a busy host (imports and checksums hold the interpreter),
        # which then never ends.
        timeout_worker_healthcheck=30,
    )
