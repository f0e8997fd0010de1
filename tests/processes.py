"""The server as a process for tests: `python -m service` on a free port, and raw sockets to talk to it (a
request's headers without its body, a multipart body, one response read back)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from loadtests.server import all_started, free_port
from tests.helpers import ROOT

BOUNDARY = "rac-test-boundary"


def environ(artifacts: Path, port: int, **env: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAC_") and k != "REDIS_URL"}
    clean.pop("PROMETHEUS_MULTIPROC_DIR", None)
    # gRPC off unless a test names a port: never the well-known 8001 that another server may hold.
    fixed = {"RAC_ARTIFACTS": str(artifacts), "RAC_PORT": str(port), "RAC_GRPC_PORT": "0", "TQDM_DISABLE": "1"}
    return clean | fixed | env


@contextmanager
def server(artifacts: Path, logfile: Path | None = None, /, **env: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`python -m service` on a free port, its log in `logfile` (else a temporary file); yields the process and
    its URL once /readyz answers 200 and every server process listens."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(logfile, "w+") if logfile else tempfile.TemporaryFile("w+") as log:
        cmd = [sys.executable, "-m", "service"]
        variables = environ(artifacts, port, **env)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=variables, stdout=log, stderr=log, text=True)
        try:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, f"exited with {proc.returncode}: {log.seek(0) or log.read()}"
                try:
                    if all_started(url, variables):
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "not ready in 60 s"
                time.sleep(0.1)
            yield proc, url
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def upload_head(port: int, length: int, path: str = "/classify") -> socket.socket:
    """A connection that has sent a request's headers (declaring `length` body bytes) and no body yet."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {length}\r\n\r\n".encode()
    )
    return s


def multipart(data: bytes, field: str = "image") -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="x.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def answer(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP response (status, headers, body) from a socket."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before a response: {buf!r}"
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = s.recv(65536)
        assert chunk
        body += chunk
    return int(status_line.split()[1]), headers, body


def metric(url: str, series: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {series}")
