"""The server as a process, over real sockets: refusals exit non-zero, SIGTERM drains, a burst of uploads far
above the limits is refused before the bodies are read while /readyz stays fast, and a client that sends its
whole body before reading (urllib) gets the 413."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from loadtests.server import free_port
from service.artifacts import VALUES
from tests.helpers import redis_up, tampered, unavailable, wait_until
from tests.processes import ROOT, answer, environ, metric, multipart, server, upload_head
from tests.synthetic import png

pytestmark = pytest.mark.slow
# ---------------------------------------------------------------- refusing to start


@pytest.mark.parametrize(
    ("command", "workers"),
    [(["-m", "service"], "1"), (["-m", "service"], "2"), (["-m", "rac.cli", "serve"], "2")],
)
def test_a_refusal_to_start_exits_non_zero(
    synthetic_artifacts: Path, tmp_path: Path, workers: str, command: list[str]
) -> None:
    bad = tampered(synthetic_artifacts, tmp_path / "bad", file=VALUES)
    env = environ(bad, free_port(), RAC_WORKERS=workers)
    done = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode != 0, done.stderr
    assert "values.npy does not match the checksum" in done.stderr


def test_a_failed_warm_up_exits_non_zero_and_says_so(synthetic_artifacts: Path) -> None:
    """A pixel limit below the warm-up image's: the warm-up batch fails, so the server must not serve."""
    env = environ(synthetic_artifacts, free_port(), RAC_WORKERS="2", RAC_MAX_PIXELS="100")
    cmd = [sys.executable, "-m", "service"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode != 0
    assert "the warm-up batch failed" in done.stderr and "the limit is 100" in done.stderr


# ---------------------------------------------------------------- graceful shutdown


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_turns_readyz_503_then_answers_the_requests_in_flight(synthetic_artifacts: Path, workers: str) -> None:
    with server(synthetic_artifacts, RAC_WORKERS=workers, RAC_DRAIN_S="5") as (proc, url):
        port = int(url.rsplit(":", 1)[1])
        bodies = [multipart(png(500 + i)) for i in range(8)]
        conns = [upload_head(port, len(b)) for b in bodies]  # accepted, bodies half sent
        for s, body in zip(conns, bodies, strict=True):
            s.sendall(body[: len(body) // 2])
        wait_until(lambda: metric(url, "rac_uploads") == 8, 10, "the eight uploads admitted")
        proc.send_signal(signal.SIGTERM)
        # Still accepting, not ready (with several processes, once the launcher has passed the signal on)
        wait_until(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 503, 2.5, "readyz 503")
        # and every process goes on accepting for the drain's time (a second SIGTERM would cut it short)
        answering, until = [], time.monotonic() + 1.5
        while time.monotonic() < until:
            assert httpx.get(f"{url}/readyz", timeout=2).status_code == 503
            answering.append(httpx.get(f"{url}/info", timeout=2).json()["memory"]["pid"])
        assert len(set(answering)) == int(workers), answering
        for s, body in zip(conns, bodies, strict=True):
            s.sendall(body[len(body) // 2 :])
        statuses = [answer(s)[0] for s in conns]
        assert statuses == [200] * 8
        proc.wait(15)
        assert proc.returncode in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/readyz", timeout=2)


# ---------------------------------------------------------------- cheap refusals, bounded memory


@pytest.fixture(scope="module")
def bounded(synthetic_artifacts: Path) -> Iterator[str]:
    """One process admitting 8 uploads (RAC_MAX_PENDING) and 5 MB of bodies at once and refusing the rest at
    once (no waiting at the door: RAC_MAX_WAITING 0), caching in Redis."""
    if not redis_up():
        unavailable("no Redis on 127.0.0.1:6379", "RAC_REQUIRE_REDIS")
    limits = {"RAC_MAX_PENDING": "8", "RAC_MAX_WAITING": "0", "RAC_MAX_BODY_BYTES": "5000000"}
    limits["REDIS_URL"] = "redis://127.0.0.1:6379/0"
    # A Redis call gets 200 ms and a failure skips Redis for 0.1 s: room for a host whose cores are shared
    # (a Redis starved of CPU is slow, whatever the server does), short enough to see the cache bypassed.
    limits |= {"RAC_REDIS_TIMEOUT_MS": "200", "RAC_REDIS_RETRY_S": "0.1"}
    with server(synthetic_artifacts, RAC_WORKERS="1", **limits) as (_, url):
        yield url


def refused(url: str) -> float:
    return metric(url, "rac_refused_total")


def test_a_burst_far_above_the_limits_is_refused_before_the_bodies_are_read(bounded: str) -> None:
    port = int(bounded.rsplit(":", 1)[1])
    before = refused(bounded)
    readyz: list[float] = []
    with ThreadPoolExecutor(1) as pool:

        def sample() -> None:
            with httpx.Client(timeout=5) as c:
                for _ in range(60):
                    t = time.perf_counter()
                    assert c.get(f"{bounded}/readyz").status_code == 200
                    readyz.append(time.perf_counter() - t)
                    time.sleep(0.01)

        sampling = pool.submit(sample)
        for length, admitted, words in ((2_000_000, 2, "bytes of request bodies"), (1000, 8, "images pending")):
            conns = [upload_head(port, length) for _ in range(64)]  # no body byte sent by any of them
            t = time.perf_counter()
            answers: list[tuple[int, dict[str, str], bytes] | None] = []
            for s in conns:
                s.settimeout(0.5)
                try:
                    answers.append(answer(s))
                except TimeoutError:
                    answers.append(None)  # admitted: waiting for its body
            waited = [a for a in answers if a is None]
            refusals = [a for a in answers if a is not None]
            assert len(waited) == admitted and len(refusals) == 64 - admitted
            assert time.perf_counter() - t < 0.5 * admitted + 5  # the refusals came at once
            for status, headers, body in refusals:
                assert status == 503 and headers["retry-after"] == "1" and words in orjson.loads(body)["detail"]
            for s in conns:
                s.close()
            # The admitted ones see their clients leave and let go of their slots.
            wait_until(lambda: metric(bounded, "rac_uploads") == metric(bounded, "rac_queue_depth") == 0, 10, "idle")
        sampling.result()
    assert refused(bounded) - before == 2 * 64 - 2 - 8
    assert np.percentile(readyz, 99) < 0.1
    r = httpx.post(f"{bounded}/classify", files={"image": ("x.png", png(1), "image/png")}, timeout=10)
    assert r.status_code == 200  # every slot was given back


def test_under_overload_the_answers_are_200_or_503_and_redis_stays_in_use(bounded: str) -> None:
    """32 clients at once against 8 admitted images, 6 distinct new images: refusals, and the neighbour
    cache still answers (the lookups of concurrent requests share one round trip)."""
    images = [png(int(time.time() * 1000) % 10**6 + 10**6 + i) for i in range(6)]  # not in Redis yet
    series = {r: f'rac_cache_total{{result="{r}"}}' for r in ("hit", "miss", "error")}
    before = {r: metric(bounded, s) for r, s in series.items()}

    def client(n: int) -> list[int]:
        with httpx.Client(timeout=30) as c:
            return [
                c.post(f"{bounded}/classify", files={"image": ("x.png", images[(n + i) % 6], "image/png")}).status_code
                for i in range(15)
            ]

    with ThreadPoolExecutor(32) as pool:
        statuses = [s for got in pool.map(client, range(32)) for s in got]
    assert set(statuses) == {200, 503}
    lookups = {r: metric(bounded, s) - before[r] for r, s in series.items()}
    assert lookups["hit"] > lookups["miss"] > 0
    assert lookups["error"] <= 0.05 * sum(lookups.values())


@pytest.mark.parametrize("megabytes", [9, 20])
def test_urllib_gets_the_413_for_a_body_over_the_limit(bounded: str, megabytes: int) -> None:
    """urllib sends the whole body before it reads the answer: the server reads and drops it, then answers."""
    request = urllib.request.Request(
        f"{bounded}/classify", data=os.urandom(megabytes * 1024 * 1024), headers={"Content-Type": "image/png"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused_:
        urllib.request.urlopen(request, timeout=30)
    assert refused_.value.code == 413
    assert "the limit is" in orjson.loads(refused_.value.read())["detail"]
