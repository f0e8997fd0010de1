"""A real uvicorn process serving an artifact directory on a local port, for benchmarks, load runs and tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx
import psutil

from service.core.batching import GAUGE_PERIOD_S
from service.settings import cores

ROOT = Path(__file__).resolve().parents[1]
STARTUP_S = 120  # loading, checking and warming up the artifacts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Each server process writes what it counts every 0.1 s (GAUGE_PERIOD_S; the process that answers /metrics, at
# once): a scrape that must see every request answered so far waits this long first.
SETTLE_S = 3 * GAUGE_PERIOD_S


def exposition(url: str, settle: bool = True) -> str:
    """GET /metrics: with `settle`, once every server process has written what it counted so far."""
    if settle:
        time.sleep(SETTLE_S)
    return httpx.get(f"{url}/metrics", timeout=5).text


def scrape(url: str, settle: bool = True) -> dict[str, float]:
    """rac_* samples from /metrics, keyed by name and labels as written (settle: as exposition() says)."""
    return samples(exposition(url, settle))


def samples(exposition: str) -> dict[str, float]:
    """The rac_* samples of a Prometheus text exposition (but the stage histograms' buckets), keyed by name and
    labels as written."""
    out = {}
    for line in exposition.splitlines():
        if line.startswith("rac_") and not line.startswith("rac_stage_seconds_bucket"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def listening(port: int) -> set[int]:
    """The processes listening on `port`: each server process listens on a socket of its own once it has
    started (the supervisor of several holds the port bound, not listening)."""
    found = psutil.net_connections("tcp")
    return {c.pid for c in found if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}


def all_started(url: str, env: dict[str, str]) -> bool:
    """Whether `url` answers /readyz 200 and every one of the server's processes (RAC_WORKERS in `env`, else
    one per core) listens: the first one ready answers /readyz while the others may still be loading."""
    if httpx.get(f"{url}/readyz", timeout=2).status_code != 200:
        return False
    return len(listening(int(url.rsplit(":", 1)[1]))) >= (int(env.get("RAC_WORKERS") or 0) or cores())


def wait_ready(proc: subprocess.Popen[str], log: IO[str], url: str, ready: Callable[[], bool]) -> None:
    """Until `ready()` (an HTTP error counts as not yet) for the server `proc` started at `url`, its output in
    `log`: RuntimeError with that output where it exits first, TimeoutError past STARTUP_S."""
    deadline = time.monotonic() + STARTUP_S
    while proc.poll() is None:
        try:
            if ready():
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not become ready in {STARTUP_S} s")
        time.sleep(0.1)
    log.seek(0)
    raise RuntimeError(f"the service exited with {proc.returncode}:\n{log.read()}")


@contextmanager
def serving(artifacts: Path, root: Path = ROOT, /, **env: str) -> Iterator[str]:
    """Start `python -m service` (uvicorn, RAC_WORKERS processes) of the checkout at `root` on a free port with
    RAC_ARTIFACTS=artifacts and `env` (and no RAC_* or REDIS_URL of the caller's; gRPC off unless env names
    RAC_GRPC_PORT); yield its base URL once /readyz answers 200 and every server process listens."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RAC_") and k != "REDIS_URL"}
    environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    # gRPC stays off unless asked for (RAC_GRPC_PORT in env): never the well-known 8001 of a running demo.
    base = {"RAC_ARTIFACTS": str(artifacts), "RAC_HOST": "127.0.0.1", "RAC_PORT": str(port), "RAC_GRPC_PORT": "0"}
    environ |= base | env
    cmd = [sys.executable, "-m", "service"]
    url = f"http://127.0.0.1:{port}"
    # The log goes to a file, not a pipe: a long run's log would fill a pipe and stall the server.
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=environ, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            wait_ready(proc, log, url, lambda: all_started(url, environ))
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
