"""The neighbour cache: the packed entry format, the in-process LRU, and Redis (the real server), including
Redis that is not there."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from loadtests.server import free_port
from service.core.cache import Cache, Entry, LocalCache, Recent, RedisCache, cache_key
from service.metrics import Metrics
from tests.helpers import classify, client, png, sample


def entry(seed: int = 0, d: int = 256, k: int = 100) -> Entry:
    rng = np.random.default_rng(seed)
    return Entry(
        rng.standard_normal(d).astype(np.float32), rng.integers(0, 60_000, k), rng.random(k).astype(np.float32)
    )


def counts(m: Metrics) -> dict[str, float]:
    m.flush()
    return {r: m.registry.get_sample_value("rac_cache_total", {"result": r}) or 0.0 for r in ("hit", "miss", "error")}


def test_entries_round_trip_exactly_and_compactly() -> None:
    e = entry()
    blob = e.pack()
    assert len(blob) == 7 + 4 * 256 + 12 * 100  # header: format version, d, k, query dimension (0)
    back = Entry.unpack(blob)
    assert np.array_equal(back.z, e.z) and np.array_equal(back.ids, e.ids) and np.array_equal(back.sims, e.sims)
    with pytest.raises(ValueError):
        Entry.unpack(blob[:-4])
    far = Entry(e.z, np.array([2**31, 2**40 + 7, 3]), e.sims[:3])  # ids past 32 bits come back as they went
    assert np.array_equal(Entry.unpack(far.pack()).ids, far.ids)


def test_keys_depend_on_the_bytes_the_memory_and_its_version() -> None:
    assert cache_key(b"abc", "a", "v1") == cache_key(b"abc", "a", "v1")
    keys = {cache_key(b"abc", "a", "v1"), cache_key(b"abd", "a", "v1"), cache_key(b"abc", "a", "v2")}
    assert len(keys | {cache_key(b"abc", "b", "v1")}) == 4


def test_local_cache_evicts_the_least_recently_used() -> None:
    async def run() -> None:
        c = LocalCache(entries=2)
        await c.set("a", b"1", 60)
        await c.set("b", b"2", 60)
        assert await c.get("a") == b"1"  # a is now the most recent
        await c.set("c", b"3", 60)
        assert await c.get("b") is None and await c.get("a") == b"1" and await c.get("c") == b"3"

    asyncio.run(run())


def test_neighbour_cache_counts_hits_and_misses() -> None:
    async def run() -> Metrics:
        m = Metrics()
        cache = Cache(LocalCache(10), 60, m)
        assert await cache.get("k") is None
        cache.put("k", entry())
        await cache.written()  # the write runs in the background
        got = await cache.get("k")
        assert got is not None and np.array_equal(got.ids, entry().ids)
        await cache.close()
        return m

    assert counts(asyncio.run(run())) == {"hit": 1, "miss": 1, "error": 0}


def test_redis_cache_stores_with_a_ttl(redis_url: str) -> None:
    async def run() -> None:
        store = RedisCache(redis_url, timeout_s=0.5, retry_s=1.0)
        key = f"rac:test:{time.time_ns()}"
        await store.set(key, entry().pack(), 30)
        assert Entry.unpack(await store.get(key)).ids[0] == entry().ids[0]  # type: ignore[arg-type]
        assert 0 < await store.client.ttl(key) <= 30
        await store.client.delete(key)
        await store.close()

    asyncio.run(run())


def test_writes_to_redis_go_in_the_next_round_trip_and_a_failed_one_is_counted(redis_url: str) -> None:
    key = f"rac:test:{time.time_ns()}"

    async def run(url: str) -> Metrics:
        m = Metrics()
        cache = Cache(RedisCache(url, timeout_s=0.5, retry_s=1.0), 60, m)
        cache.put(key, entry())  # no task: a future that the round trip settles
        await cache.written()
        await cache.close()
        return m

    async def stored() -> bytes | str | None:
        store = RedisCache(redis_url, timeout_s=0.5, retry_s=1.0)
        blob = await store.client.get(key)
        await store.client.delete(key)
        await store.close()
        return blob

    assert counts(asyncio.run(run(redis_url))) == {"hit": 0, "miss": 0, "error": 0}
    assert asyncio.run(stored()) == entry().pack()
    # The round trip fails: the write is counted as the cache's error.
    assert counts(asyncio.run(run(f"redis://127.0.0.1:{free_port()}/0"))) == {"hit": 0, "miss": 0, "error": 1}


def test_unreachable_redis_is_skipped_fast_and_counted() -> None:
    now = [0.0]  # the breaker's clock, moved by the test

    async def run() -> tuple[Metrics, float, RedisCache]:
        m = Metrics()
        store = RedisCache(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.05, retry_s=0.3, clock=lambda: now[0])
        cache = Cache(store, 60, m)
        assert await cache.get("k") is None  # the failure: counted, and the breaker opens
        t = time.perf_counter()
        for _ in range(20):  # while open, no network at all
            assert await cache.get("k") is None
        fast = time.perf_counter() - t
        cache.put("k", entry())
        await cache.close()
        return m, fast, store

    m, fast, store = asyncio.run(run())
    assert counts(m) == {"hit": 0, "miss": 0, "error": 22}
    assert fast < 0.02
    assert not store.available
    now[0] += 0.29
    assert not store.available
    now[0] += 0.02
    assert store.available  # after retry_s it is tried again


def test_an_image_sent_again_is_answered_from_the_recent_answers_as_it_was_computed(
    synthetic_artifacts: Path,
) -> None:
    with client(synthetic_artifacts) as c, client(synthetic_artifacts, answer_cache_entries=0) as plain:

        def heads() -> float:  # batches that ran the head
            return sample(c.get("/metrics").text, "rac_stage_seconds_count", stage="head")

        first = classify(c, png(7), neighbors=3)
        ran = heads()
        again = classify(c, png(7), neighbors=3)
        assert heads() == ran  # no batch, no head
        classify(plain, png(7), neighbors=3)
        recomputed = classify(plain, png(7), neighbors=3)  # from the neighbour cache: the head runs again
        for a in (again, recomputed):
            assert a["cached"] and not first["cached"]
            assert a["predictions"] == first["predictions"] and a["neighbors"] == first["neighbors"]
        assert again["timings_ms"]["head"] == again["timings_ms"]["encode"] == 0.0
        other = classify(c, png(7), neighbors=5)  # another answer (more neighbours described): the head runs
        assert len(other["neighbors"]) == 5
        assert heads() == ran + 1


def test_recent_answers_keep_the_last_ones_used() -> None:
    recent: Recent[int] = Recent(2)
    recent.put("a", 1)
    recent.put("b", 2)
    assert recent.get("a") == 1  # now the most recent
    recent.put("c", 3)
    assert (recent.get("a"), recent.get("b"), recent.get("c")) == (1, None, 3)
    off: Recent[int] = Recent(0)
    off.put("a", 1)
    assert off.get("a") is None
