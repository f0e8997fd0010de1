"""The neighbour cache: image bytes + memory version -> (query embedding, neighbour ids, similarities).

Redis when a URL is given, an in-process LRU otherwise. A cache failure never fails a request: Redis that
is down or slow is skipped (and the failure counted) for `retry_s`, then tried again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import cast

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service.metrics import Metrics

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<BHH")  # format version, d, k
_VERSION = 1


@dataclass(frozen=True)
class Entry:
    z: np.ndarray  # (d,) float32
    ids: np.ndarray  # (k,) int64
    sims: np.ndarray  # (k,) float32

    def pack(self) -> bytes:
        """4 bytes a dimension and 8 a neighbour: float32 z and sims (answers stay exactly those of an
        uncached request), int32 ids."""
        header = _HEADER.pack(_VERSION, len(self.z), len(self.ids))
        parts = (self.z.astype("<f4"), self.ids.astype("<i4"), self.sims.astype("<f4"))
        return header + b"".join(p.tobytes() for p in parts)

    @classmethod
    def unpack(cls, blob: bytes) -> Entry:
        version, d, k = _HEADER.unpack_from(blob)
        if version != _VERSION or len(blob) != _HEADER.size + 4 * d + 8 * k:
            raise ValueError("cache entry of another format")
        z = np.frombuffer(blob, "<f4", d, _HEADER.size)
        ids = np.frombuffer(blob, "<i4", k, _HEADER.size + 4 * d).astype(np.int64)
        sims = np.frombuffer(blob, "<f4", k, _HEADER.size + 4 * d + 4 * k)
        return cls(z, ids, sims)


def cache_key(image: bytes, memory_version: str, k: int = 0, dim: int = 0) -> str:
    """The image's hash, and what decides an entry's meaning and shape: memory version, k, dimension."""
    return f"rac:nb:{memory_version}:{k}:{dim}:{hashlib.blake2b(image, digest_size=16).hexdigest()}"


class LocalCache:
    """In-process LRU: the embedded default."""

    backend = "memory"

    def __init__(self, entries: int):
        self.entries = entries
        self._data: OrderedDict[str, bytes] = OrderedDict()

    async def get(self, key: str) -> bytes | None:
        blob = self._data.get(key)
        if blob is not None:
            self._data.move_to_end(key)
        return blob

    async def set(self, key: str, blob: bytes, ttl_s: int) -> None:
        self._data[key] = blob
        self._data.move_to_end(key)
        while len(self._data) > self.entries:
            self._data.popitem(last=False)

    async def close(self) -> None:
        self._data.clear()


class RedisCache:
    """Redis with short timeouts and a breaker: after a failure, skip Redis for `retry_s` seconds."""

    backend = "redis"

    def __init__(self, url: str, timeout_s: float, retry_s: float):
        # No client-side retries: a failed call is skipped at once, the breaker decides when to try again.
        self.client = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )
        self.timeout_s, self.retry_s = timeout_s, retry_s
        self.down_until = 0.0

    @property
    def available(self) -> bool:
        return time.monotonic() >= self.down_until

    def _failed(self, e: Exception) -> None:
        if self.available:
            log.warning("redis unavailable (%s): going without the cache for %.1f s", e, self.retry_s)
        self.down_until = time.monotonic() + self.retry_s

    async def get(self, key: str) -> bytes | None:
        if not self.available:
            raise CacheUnavailable
        try:
            return await asyncio.wait_for(cast(Awaitable[bytes | None], self.client.get(key)), self.timeout_s)
        except (RedisError, OSError, TimeoutError) as e:
            self._failed(e)
            raise CacheUnavailable from e

    async def set(self, key: str, blob: bytes, ttl_s: int) -> None:
        if not self.available:
            raise CacheUnavailable
        try:
            await asyncio.wait_for(self.client.set(key, blob, ex=ttl_s), self.timeout_s)
        except (RedisError, OSError, TimeoutError) as e:
            self._failed(e)
            raise CacheUnavailable from e

    async def close(self) -> None:
        await self.client.aclose()


class CacheUnavailable(Exception):
    pass


class NeighbourCache:
    """What the pipeline uses: typed entries, counted hits / misses / errors, failures absorbed."""

    def __init__(self, store: LocalCache | RedisCache, ttl_s: int, metrics: Metrics):
        self.store, self.ttl_s, self.metrics = store, ttl_s, metrics
        self._pending: set[asyncio.Task[None]] = set()

    async def get(self, key: str) -> Entry | None:
        try:
            blob = await self.store.get(key)
            entry = Entry.unpack(blob) if blob is not None else None
        except CacheUnavailable:
            self.metrics.cache.labels("error").inc()
            return None
        except (ValueError, struct.error):
            entry = None  # an entry in another format: recompute it (and overwrite it)
        self.metrics.cache.labels("hit" if entry is not None else "miss").inc()
        return entry

    def put(self, key: str, entry: Entry) -> None:
        """Write in the background: the answer never waits for the cache."""
        task = asyncio.get_running_loop().create_task(self._put(key, entry.pack()))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _put(self, key: str, blob: bytes) -> None:
        try:
            await self.store.set(key, blob, self.ttl_s)
        except CacheUnavailable:
            self.metrics.cache.labels("error").inc()

    async def close(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self.store.close()
