"""Overload: many connections, each sending distinct images back to back, with every answer's status and
latency recorded, so that the successful requests' latency is not mixed with fast refusals (wrk's
histogram mixes them). Meanwhile a prober asks /readyz on a fresh connection every 100 ms, as a load
balancer would.

    python -m loadtests.overload --url http://127.0.0.1:8000 --connections 1024 --seconds 20 --bodies FILE

FILE holds length-prefixed multipart bodies (as `rac bench` writes them). Prints one JSON object.
The generator is one asyncio process (uvloop): its own CPU time is reported by the caller.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import multiprocessing
import queue
import socket
import time
from collections import Counter
from collections.abc import Iterator
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from loadtests import multipart

REFUSED = (503, 429)  # the statuses of a refusal for load


def read_bodies(path: Path) -> list[bytes]:
    data, bodies, pos = path.read_bytes(), [], 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        n = int(data[pos:nl])
        bodies.append(data[nl + 1 : nl + 1 + n])
        pos = nl + 1 + n
    return bodies


def write_bodies(path: Path, bodies: list[bytes], extras: list[str] | None = None) -> None:
    """`<length>[ <extra>]\n<body>` each; an extra (a per-body header value for bench.py's wrk script) where given."""
    with path.open("wb") as f:
        for i, body in enumerate(bodies):
            extra = f" {extras[i]}" if extras else ""
            f.write(f"{len(body)}{extra}\n".encode() + body)


async def _response(reader: asyncio.StreamReader) -> tuple[int, bool, bool]:
    """Read one HTTP/1.1 response: (status, whether the server closes the connection, whether it says when to
    retry)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers.get("connection", "").lower() == "close", "retry-after" in headers


async def _connection(
    host: str, port: int, requests: Iterator[bytes], deadline: float, out: list[tuple[int, float, bool]]
) -> None:
    """One client connection: a request, its answer, the next; reconnect when the server closes."""
    writer: asyncio.StreamWriter | None = None
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            writer.write(next(requests))
            status, close, retry = await asyncio.wait_for(_response(reader), max(0.1, deadline + 10 - t))
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            status, close, retry = 0, True, False  # a socket error: counted, never retried at once
        out.append((status, time.perf_counter() - t, retry))
        if close and writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            writer = None
        if status == 0:
            await asyncio.sleep(0.05)
    if writer is not None:
        writer.close()


def probe_ready(url: str, stop: Event, out: Queue[float]) -> None:
    """/readyz every 100 ms on a new connection, as a load balancer asks, in a process of its own (a thread
    beside the generator would wait for the generator's GIL and time that too); a failure or a 5 s wait
    counts as 5 s."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = f"GET /readyz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    while not stop.is_set():
        t = time.perf_counter()
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(request)
                ok = s.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            ok = False
        out.put(time.perf_counter() - t if ok else 5.0)
        stop.wait(0.1)


async def _run(url: str, bodies: list[bytes], connections: int, seconds: float) -> list[tuple[int, float, bool]]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: {multipart.CONTENT_TYPE}\r\n"
    prepared = [f"{head}Content-Length: {len(b)}\r\n\r\n".encode() + b for b in bodies]
    requests = itertools.cycle(prepared)
    out: list[tuple[int, float, bool]] = []
    deadline = time.perf_counter() + seconds
    await asyncio.gather(*(_connection(host, port, requests, deadline, out) for _ in range(connections)))
    return out


def measure(url: str, bodies: list[bytes], connections: int, seconds: float) -> dict[str, Any]:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    ctx = multiprocessing.get_context("spawn")
    stop, probes = ctx.Event(), ctx.Queue()
    prober = ctx.Process(target=probe_ready, args=(url, stop, probes), daemon=True)
    prober.start()
    probes.get(timeout=60)  # its first probe, before the load: the prober has started
    t = time.perf_counter()
    answers = asyncio.run(_run(url, bodies, connections, seconds))
    wall = time.perf_counter() - t
    stop.set()
    prober.join()
    ready = []
    with contextlib.suppress(queue.Empty):  # the prober has exited: what it sent is all there
        while True:
            ready.append(probes.get(timeout=0.5))
    statuses = Counter(s for s, _, _ in answers)
    ok = np.array([d for s, d, _ in answers if s == 200]) * 1000
    refused = np.array([d for s, d, _ in answers if s in REFUSED]) * 1000

    def pct(a: np.ndarray, q: float) -> float | None:
        return float(np.percentile(a, q)) if len(a) else None

    return {
        "connections": connections,
        "seconds": wall,
        "ok_per_s": statuses[200] / wall,
        "refused_per_s": sum(statuses[s] for s in REFUSED) / wall,
        "statuses": {str(s): n for s, n in sorted(statuses.items())},  # 0: socket errors
        # Answers that are neither a success nor a refusal (503, 429) that says when to retry: none expected.
        "errors": {str(s): n for s, n in sorted(statuses.items()) if s != 200 and s not in REFUSED},
        "refused_without_retry_after": sum(1 for s, _, retry in answers if s in REFUSED and not retry),
        "ok_p50_ms": pct(ok, 50),
        "ok_p99_ms": pct(ok, 99),
        "refused_p50_ms": pct(refused, 50),
        "refused_p99_ms": pct(refused, 99),
        "readyz_p99_ms": pct(np.array(ready) * 1000, 99),
        "readyz_max_ms": pct(np.array(ready) * 1000, 100),
        "readyz_probes": len(ready),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--connections", type=int, required=True)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--bodies", type=Path, required=True)
    a = p.parse_args()
    print(json.dumps(measure(a.url, read_bodies(a.bodies), a.connections, a.seconds)))


if __name__ == "__main__":
    main()
