"""Under pressure, as real processes: every route that takes an upload (the service's, the Open Inference
Protocol's over REST and gRPC) goes through one door, where past the limits a request waits, its body unread,
or is refused at once with 503 and Retry-After (gRPC: UNAVAILABLE); a request that waited past its budget is
refused; and a bounded burst far past the limits gets only answers and refusals, never another error, while
/readyz keeps answering within 100 ms."""

from __future__ import annotations

import base64
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import orjson
import pytest

from loadtests import multipart as load_multipart
from loadtests.images import pngs
from loadtests.overload import write_bodies
from loadtests.server import free_port
from loadtests.v2load import METHOD, grpc_request
from service.api.parking import OneWrite
from tests.helpers import client, wait_until
from tests.processes import BOUNDARY, ROOT, answer, metric, multipart, server, upload_head
from tests.synthetic import png

pytestmark = pytest.mark.slow
HELD, WAITING, BURST = 2, 4, 10  # slots held by stalled uploads, requests let wait, requests in a burst


def _multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    """(field, filename or None for a text field, data) -> body, content type."""
    boundary = "rac-burst"
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _v2(image: bytes) -> tuple[bytes, str]:
    tensor = {"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image).decode()]}
    return orjson.dumps({"inputs": [tensor]}), "application/json"


# path -> (a request body and its content type, the status of an admitted request on synthetic artifacts,
# the key of the message in a refusal)
ROUTES: dict[str, tuple[Callable[[bytes], tuple[bytes, str]], int, str]] = {
    "/classify": (lambda i: _multipart([("image", "x.png", i)]), 200, "detail"),
    "/classify/batch": (lambda i: _multipart([("images", "a.png", i)]), 200, "detail"),
    # No zero-shot parts in the synthetic artifacts: an admitted request is answered 404, a refused one 503.
    "/classify/zero-shot": (lambda i: _multipart([("image", "x.png", i), ("labels", None, b"cat")]), 404, "detail"),
    "/v2/models/rac/infer": (_v2, 200, "error"),
    "/v2/models/rac/versions/1/infer": (_v2, 200, "error"),
}


@pytest.fixture(scope="module")
def patient(synthetic_artifacts: Path) -> Iterator[tuple[str, int]]:
    """One process admitting 2 uploads at once and letting 4 more wait (for up to a minute); gRPC on."""
    grpc_port = free_port()
    env = {"RAC_WORKERS": "1", "RAC_MAX_PENDING": str(HELD), "RAC_MAX_WAITING": str(WAITING)}
    env |= {"RAC_MAX_QUEUE_S": "60", "RAC_GRPC_PORT": str(grpc_port)}
    with server(synthetic_artifacts, **env) as (_, url):
        yield url, grpc_port


def _hold(url: str) -> list[tuple[socket.socket, bytes]]:
    """HELD uploads that have sent their headers and no body: the door holds a slot for each."""
    body = multipart(png(7))
    port = int(url.rsplit(":", 1)[1])
    return [(upload_head(port, len(body)), body) for _ in range(HELD)]


def _burst(url: str, send: Callable[[int], int]) -> list[int]:
    """BURST requests at once while the slots are held: WAITING of them wait and the rest are refused at once;
    then the held uploads send their bodies, and the waiting ones are served in turn."""
    before = metric(url, "rac_refused_total")
    held = _hold(url)
    with ThreadPoolExecutor(BURST) as pool:
        burst: list[Future[int]] = [pool.submit(send, i) for i in range(BURST)]
        refused = BURST - WAITING
        wait_until(lambda: sum(f.done() for f in burst) == refused, 20, "the refusals")
        assert metric(url, "rac_refused_total") - before == refused and metric(url, "rac_waiting") == WAITING
        assert sum(f.done() for f in burst) == refused  # the others wait
        for s, body in held:
            s.sendall(body)
            assert answer(s)[0] == 200
            s.close()
        return [f.result(timeout=60) for f in burst]


@pytest.mark.parametrize("path", list(ROUTES))
def test_a_burst_on_an_upload_route_waits_at_the_door_or_is_refused(patient: tuple[str, int], path: str) -> None:
    url, _ = patient
    encode, admitted, key = ROUTES[path]
    images = [png(1000 + i) for i in range(BURST)]

    def send(i: int) -> int:
        body, content_type = encode(images[i])
        r = httpx.post(f"{url}{path}", content=body, headers={"content-type": content_type}, timeout=60)
        if r.status_code == 503:  # a small body: dropped as it comes, the connection kept
            assert r.headers["retry-after"] == "1" and "connection" not in r.headers
            assert "overloaded" in r.json()[key]
        return r.status_code

    assert sorted(_burst(url, send)) == sorted([admitted] * WAITING + [503] * (BURST - WAITING))


def test_a_burst_of_grpc_calls_waits_at_the_door_or_is_refused(patient: tuple[str, int]) -> None:
    url, port = patient
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = channel.unary_unary(METHOD)
        infer(grpc_request(png(1)), timeout=30)  # connected

        def send(i: int) -> int:
            try:
                infer(grpc_request(png(2000 + i)), timeout=60)
                return 200
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE and "overloaded" in (e.details() or "")
                return 503

        assert sorted(_burst(url, send)) == sorted([200] * WAITING + [503] * (BURST - WAITING))


@pytest.fixture(scope="module")
def impatient(synthetic_artifacts: Path) -> Iterator[str]:
    """One process admitting 8 uploads and letting 32 more wait at most 0.5 s."""
    env = {"RAC_WORKERS": "1", "RAC_MAX_PENDING": "8", "RAC_MAX_WAITING": "32", "RAC_MAX_QUEUE_S": "0.5"}
    with server(synthetic_artifacts, **env) as (_, url):
        yield url


def test_a_request_that_waited_past_its_budget_is_refused(impatient: str) -> None:
    """Refused once its 0.5 s at the door are over, body unread: a small body will be dropped as it comes and
    the connection kept; a big one is never read, and its connection closed."""
    port = int(impatient.rsplit(":", 1)[1])
    body = multipart(png(3))
    held = [upload_head(port, len(body)) for _ in range(8)]
    late, big = upload_head(port, len(body)), upload_head(port, 200_000)
    t = time.perf_counter()
    for s, kept in ((late, True), (big, False)):
        status, headers, detail = answer(s)
        assert status == 503 and headers["retry-after"] == "1" and ("connection" not in headers) == kept
        assert "waited 0.5 s" in orjson.loads(detail)["detail"]
    assert time.perf_counter() - t >= 0.45
    for s in [*held, late, big]:
        s.close()


def test_a_bounded_burst_gets_answers_and_refusals_only_and_readyz_stays_fast(impatient: str, tmp_path: Path) -> None:
    """256 connections sending new images back to back for 4 s at a process that admits 8 and lets 32 wait:
    its loop stays saturated; /readyz is probed on new connections meanwhile from a process of its own."""
    bodies = [load_multipart.encode([("image", p)]) for p in itertools.islice(pngs(), 3000)]
    write_bodies(tmp_path / "bodies", bodies)
    cmd = [sys.executable, "-m", "loadtests.overload", "--url", impatient, "--connections", "256"]
    cmd += ["--seconds", "4", "--bodies", str(tmp_path / "bodies")]
    done = subprocess.run(cmd, cwd=ROOT, env=os.environ, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["statuses"].get("200", 0) > 0 and stats["refused_per_s"] > 0  # past its limits, still serving
    assert stats["errors"] == {} and stats["refused_without_retry_after"] == 0
    assert stats["readyz_probes"] >= 20 and stats["readyz_p99_ms"] < 100


def test_an_answer_leaves_in_one_write_and_a_100_continue_at_once(impatient: str) -> None:
    """The status line and headers wait for the body and go out with it (service/api/parking.py: OneWrite);
    a 100 Continue is not held back (the client waits for it before sending its body), and the answer to a
    HEAD, which has no body, still goes out."""
    writes: list[bytes] = []
    transport = OneWrite(Recorder(writes))  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    transport.write(b"{}")
    transport.write(b"more")
    assert writes[1:] == [b"HTTP/1.1 200 OK\r\n\r\n{}", b"more"]

    port = int(impatient.rsplit(":", 1)[1])
    body = multipart(png(5))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        head = f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        s.sendall(f"{head}Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
        assert s.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(body)
        status, headers, got = answer(s)
        assert status == 200 and len(got) == int(headers["content-length"]) and orjson.loads(got)["predictions"]
        s.sendall(b"HEAD /info HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = s.recv(4096)
            assert chunk, reply
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 405 ") and reply.endswith(b"\r\n\r\n")


class Recorder:
    def __init__(self, writes: list[bytes]):
        self.writes = writes

    def write(self, data: bytes) -> None:
        self.writes.append(data)


def test_probes_are_answered_by_the_protocol_as_by_the_routes(impatient: str, synthetic_artifacts: Path) -> None:
    """GET /healthz and /readyz come from the HTTP protocol (no task, no app); the same as the routes say."""
    port = int(impatient.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # two probes on one kept connection
        for path in ("/healthz", "/readyz"):
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, headers, body = answer(s)
            with client(synthetic_artifacts) as routes:
                want = routes.get(path)
            assert (status, orjson.loads(body)) == (want.status_code, want.json())
            assert headers["content-type"] == "application/json" and "connection" not in headers
    assert metric(impatient, 'rac_requests_total{route="/readyz",status="200"}') >= 1
    r = httpx.post(f"{impatient}/readyz")  # not a probe: the app answers
    assert r.status_code == 405
