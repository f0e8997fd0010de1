"""Failure paths and limits, in-process: a preprocessing error reaches the consumer, the batcher waits only
for images still on their way, the in-process cache honours its TTL, Redis replies survive a busy event
loop, a body without a length is bounded by the byte budget, a failed warm-up refuses to start, and the 413
for too many pixels names the service's limit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models import features
from service.app import create_app
from service.core.cache import LocalCache, RedisCache
from service.core.decode import InputSpec, decode
from service.core.pipeline import Pipeline
from service.errors import RequestError
from service.settings import Settings
from tests.helpers import client, png_header_only
from tests.synthetic import png

SPEC = InputSpec(16, True, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class Images:
    """An image set whose `bad`-th image cannot be read, like a corrupt file in a list."""

    def __init__(self, n: int, bad: int):
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def image(self, i: int) -> Image.Image:
        if i == self.bad:
            raise OSError(f"image file {i} is truncated")
        return Image.new("L", (16, 16), i)


def test_an_error_in_the_preprocessing_thread_reaches_the_consumer() -> None:
    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(lambda: list(_batches(Images(40, bad=25), SPEC, batch=4)))
        with pytest.raises(OSError, match="image file 25 is truncated"):
            done.result(timeout=20)  # before the fix: waits forever
    assert len(list(_batches(Images(10, bad=-1), SPEC, batch=4))) == 3  # (and without errors: every batch)


def _batches(images: Images, spec: InputSpec, batch: int) -> Iterator[np.ndarray]:
    return features._batches(images, spec, batch)  # type: ignore[arg-type]  # an image set by duck typing


def test_a_batch_does_not_wait_for_images_that_failed(synthetic_artifacts: Path) -> None:
    """Three undecodable images and one good one, with a 1 s batching window: nothing is left on its way
    once the good image is queued, so it runs at once."""
    files = [("images", (f"{i}.png", b"not an image", "image/png")) for i in range(3)]
    files.append(("images", ("ok.png", png(42), "image/png")))
    with client(synthetic_artifacts, max_wait_ms=1000, max_batch=8) as c:
        c.post("/classify", files={"image": ("x.png", png(41), "image/png")})  # first-request costs paid
        t = time.perf_counter()
        r = c.post("/classify/batch", files=files)
        elapsed = time.perf_counter() - t
    assert [e["status"] for e in r.json()["results"]] == [415, 415, 415, 200]
    assert elapsed < 0.5


def test_the_local_cache_honours_the_ttl() -> None:
    now = [100.0]
    cache = LocalCache(10, clock=lambda: now[0])

    async def run() -> list[object]:
        await cache.set("a", b"1", ttl_s=5)
        await cache.set("b", b"2", ttl_s=60)
        seen = [await cache.get("a")]
        now[0] += 5.5
        return [*seen, await cache.get("a"), await cache.get("b")]

    assert asyncio.run(run()) == [b"1", None, b"2"]
    assert list(cache._data) == ["b"]  # the expired entry is gone, not just hidden


def test_a_busy_event_loop_does_not_make_redis_look_slow(redis_url: str) -> None:
    """The loop is blocked for 120 ms (50 ms timeout) at each moment of a GET in turn: before it is sent,
    while its reply is on its way, after: the reply that arrived meanwhile is used, and Redis stays in use."""

    async def run(turns: int) -> tuple[bytes | None, bool]:
        cache = RedisCache(redis_url, timeout_s=0.05, retry_s=10)
        await cache.client.set("rac:test:busy-loop", b"value", ex=10)  # connected (with no 50 ms limit)
        get = asyncio.ensure_future(cache.get("rac:test:busy-loop"))
        for _ in range(turns):
            await asyncio.sleep(0)
        time.sleep(0.12)  # the loop busy elsewhere
        got, available = await get, cache.available
        await cache.close()
        return got, available

    assert [asyncio.run(run(turns)) for turns in range(10)] == [(b"value", True)] * 10


def test_redis_that_really_is_slow_is_given_up(redis_url: str) -> None:
    async def run() -> float:
        cache = RedisCache(redis_url, timeout_s=0.05, retry_s=10)
        await cache.client.ping()
        t = time.perf_counter()
        with pytest.raises(TimeoutError):
            await cache._call(cache.client.blpop(["rac:test:never"], timeout=1))  # a reply 1 s away
        await cache.close()
        return time.perf_counter() - t

    assert asyncio.run(run()) < 0.2


@pytest.fixture
def budget(synthetic_artifacts: Path) -> Iterator[TestClient]:
    with client(synthetic_artifacts, max_body_bytes=50_000) as c:
        yield c


def test_a_body_without_a_length_is_counted_against_the_byte_budget(budget: TestClient) -> None:
    def chunks() -> Iterator[bytes]:  # chunked: the bytes are counted as they come
        for _ in range(20):
            yield b"\0" * 5000

    r = budget.post("/classify", content=chunks(), headers={"content-type": "image/png"})
    assert r.status_code == 503 and "bytes of request bodies" in r.json()["detail"]
    assert r.headers["retry-after"] == "1"
    r = budget.post("/classify", files={"image": ("x.png", png(3), "image/png")})
    assert r.status_code == 200  # and the bytes were given back


def test_a_failed_warm_up_refuses_to_start(synthetic_artifacts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Pipeline) -> None:
        raise RuntimeError("encoder crashed on its first batch")

    monkeypatch.setattr(Pipeline, "warmup", broken)
    with (
        pytest.raises(RuntimeError, match="first batch"),
        TestClient(create_app(Settings(artifacts=synthetic_artifacts))),
    ):
        pass


def test_too_many_pixels_quotes_the_services_limit() -> None:
    """Over Pillow's own bomb limit (about 89 million pixels) as under it."""
    for side in (8_000, 20_000):
        with pytest.raises(RequestError) as e:
            decode(png_header_only(side, side), SPEC, max_pixels=40_000_000)
        assert e.value.status == 413
        assert e.value.message == f"image is {side}x{side} = {side * side} pixels; the limit is 40000000"
    assert decode(png(1), SPEC, max_pixels=10**6).shape == (3, 16, 16)
    assert np.isfinite(decode(png(1), SPEC, max_pixels=10**6)).all()
