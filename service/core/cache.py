"""The neighbour cache: image bytes + memory version -> (query embedding, neighbour ids, similarities; and in a
fine-tuned build the head's query vector).

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service.metrics import Metrics

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<BHHH")  # format version, d, k, dq (0: no separate query vector)
LAG_TURNS = 3  # further turns a Redis call gets when the event loop was late (see RedisCache._call)
LAG_S = 0.002  # a timer this late or more means the loop was busy elsewhere
T = TypeVar("T")
_Op = tuple[str, str, bytes | None, int]  # "get" or "set", key, blob, TTL
_VERSION = 3  # 2: the query vector of a fine-tuned build; 3: 64-bit ids


@dataclass(frozen=True)
class Entry:
    z: np.ndarray  # (d,) float32: the search key
    ids: np.ndarray  # (k,) int64
    sims: np.ndarray  # (k,) float32
    query: np.ndarray | None = None  # (dq,) float32: the head's query vector where it is not z (fine-tuned)

    def pack(self) -> bytes:
        """4 bytes a dimension and 12 a neighbour: float32 z, query and sims (answers stay exactly those of an
        uncached request), int64 ids (an item's id is 64-bit and never reused: one cut to 32 bits could name
        another item)."""
        query = b"" if self.query is None else self.query.astype("<f4", copy=False).tobytes()
        header = _HEADER.pack(_VERSION, len(self.z), len(self.ids), len(query) // 4)
        parts = (
            self.z.astype("<f4", copy=False),
            self.ids.astype("<i8", copy=False),
            self.sims.astype("<f4", copy=False),
        )
        return b"".join((header, *(p.tobytes() for p in parts), query))

    @classmethod
    def unpack(cls, blob: bytes) -> Entry:
        if not blob or blob[0] != _VERSION:
            raise ValueError("cache entry of another format")
        _, d, k, dq = _HEADER.unpack_from(blob)
        if len(blob) != _HEADER.size + 4 * d + 12 * k + 4 * dq:
            raise ValueError("cache entry of another format")
        z = np.frombuffer(blob, "<f4", d, _HEADER.size)
        ids = np.frombuffer(blob, "<i8", k, _HEADER.size + 4 * d).astype(np.int64)
        sims = np.frombuffer(blob, "<f4", k, _HEADER.size + 4 * d + 8 * k)
        query = np.frombuffer(blob, "<f4", dq, _HEADER.size + 4 * d + 12 * k) if dq else None
        return cls(z, ids, sims, query)


def cache_key(
    image: bytes, memory: str, memory_version: str, k: int = 0, dim: int = 0, only: str = "", query: str = ""
) -> str:
    """The image's hash, and what decides an entry's meaning and shape: the named memory and its version, k,
    dimension, the filter its neighbours were found under (`Filter.key()`; "" for none), and in a fine-tuned
    build the query encoder (two builds may share a memory and differ in their query vectors)."""
    # SHA-256, cut to 128 bits: with the CPU's SHA instructions (x86 SHA-NI, ARMv8's crypto extension) it takes
    # about half blake2b's time, and every upload is hashed on the event loop.
    image_hash = hashlib.sha256(image).hexdigest()[:32]
    where = f"{memory}:{memory_version}:{k}:{dim}" + (f":{only}" if only else "") + (f":q{query}" if query else "")
    return f"rac:nb:{where}:{image_hash}"


def label_key(label: str, template: str, memory_version: str, parts: str) -> str:
    """A zero-shot label's refined embedding: label, prompt template, memory version and the zero-shot
    model parts (text tower, fusion modules) that made it."""
    h = hashlib.blake2b(f"{template}\0{label}".encode(), digest_size=16).hexdigest()
    return f"rac:zs:{memory_version}:{parts}:{h}"


class Recent(Generic[T]):
    """The last `entries` answers this process computed, by key: an image sent again is answered from here,
    without the hop to the batch thread and without the head. Exact, as the neighbour cache is: its key names
    the memory version, the filter, k and the query encoder, and a version never changes. Event loop only."""

    def __init__(self, entries: int):
        self.entries = entries
        self._data: OrderedDict[object, T] = OrderedDict()

    def get(self, key: object) -> T | None:
        found = self._data.get(key)
        if found is not None:
            self._data.move_to_end(key)
        return found

    def put(self, key: object, value: T) -> None:
        if self.entries <= 0:
            return
        self._data[key] = value
        while len(self._data) > self.entries:
            self._data.popitem(last=False)


class LocalCache:
    """In-process LRU whose entries expire after their TTL, as Redis's do: the embedded default. It holds what
    Redis would (bytes), or a neighbour entry as it is (Cache.put)."""

    backend = "memory"

    def __init__(self, entries: int, clock: Callable[[], float] = time.monotonic):
        self.entries, self.clock = entries, clock
        self._data: OrderedDict[str, tuple[float, bytes | Entry]] = OrderedDict()  # key -> (expiry, value)

    async def get(self, key: str) -> bytes | Entry | None:
        found = self._data.get(key)
        if found is None:
            return None
        if found[0] <= self.clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return found[1]

    async def set(self, key: str, blob: bytes | Entry, ttl_s: int) -> None:
        self.put(key, blob, ttl_s)

    def put(self, key: str, blob: bytes | Entry, ttl_s: int) -> None:
        """set(), at once: nothing to wait for in process."""
        self._data[key] = (self.clock() + ttl_s, blob)
        self._data.move_to_end(key)
        while len(self._data) > self.entries:
            self._data.popitem(last=False)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self._data.clear()


class RedisCache:
    """Redis with short timeouts and a breaker: after a failure, skip Redis for `retry_s` seconds."""

    backend = "redis"

    def __init__(self, url: str, timeout_s: float, retry_s: float, clock: Callable[[], float] = time.monotonic):
        # No client-side retries: a failed call is skipped at once, the breaker decides when to try again.
        # The client's own socket timeouts are only a backstop: _call() is the timeout that counts.
        backstop = max(1.0, 20 * timeout_s)
        self.client = aioredis.Redis.from_url(
            url, socket_timeout=backstop, socket_connect_timeout=backstop, retry=Retry(NoBackoff(), 0)
        )
        self.timeout_s, self.retry_s, self.clock = timeout_s, retry_s, clock
        self.down_until = 0.0
        self._waiting: list[tuple[_Op, asyncio.Future[bytes | None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    @property
    def available(self) -> bool:
        return self.clock() >= self.down_until

    def _failed(self, e: Exception) -> None:
        if self.available:
            log.warning("redis unavailable (%s): going without the cache for %.1f s", e, self.retry_s)
        self.down_until = self.clock() + self.retry_s

    async def get(self, key: str) -> bytes | None:
        return await self._queue(("get", key, None, 0))

    async def set(self, key: str, blob: bytes, ttl_s: int) -> None:
        await self.put(key, blob, ttl_s)

    async def start(self) -> None:
        """Connect before the first request needs it (a failure only trips the breaker)."""
        try:
            await self._call(self.client.ping())
        except (RedisError, OSError, TimeoutError) as e:
            self._failed(e)

    def put(self, key: str, blob: bytes, ttl_s: int) -> asyncio.Future[bytes | None]:
        """set() without a task of its own: the future is done once the write has gone in a round trip, with
        CacheUnavailable where Redis is skipped or the round trip failed."""
        return self._queue(("set", key, blob, ttl_s))

    def _queue(self, op: _Op) -> asyncio.Future[bytes | None]:
        """Every get and set that arrives while a round trip is under way goes in the next one: one round trip
        (one pipeline: an MGET and the SETs) per turn however many requests wait, not one per image."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes | None] = loop.create_future()
        if not self.available:
            future.set_exception(CacheUnavailable())
            return future
        self._waiting.append((op, future))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())
        return future

    async def _flush(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                gets = [(op, f) for op, f in batch if op[0] == "get"]
                sets = [(op, f) for op, f in batch if op[0] == "set"]
                pipe = self.client.pipeline(transaction=False)
                if gets:
                    pipe.mget([op[1] for op, _ in gets])
                for (_, key, blob, ttl_s), _ in sets:
                    pipe.set(key, cast(bytes, blob), ex=ttl_s)
                try:
                    replies = await self._call(pipe.execute())
                except (RedisError, OSError, TimeoutError) as e:
                    self._failed(e)
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(CacheUnavailable())
                    continue
                blobs = replies[0] if gets else []
                for (_, f), blob in zip(gets + sets, [*blobs, *[None] * len(sets)], strict=True):
                    if not f.done():
                        f.set_result(blob)
        finally:
            self._flusher = None

    async def _call(self, operation: Awaitable[T]) -> T:
        """`operation`, or TimeoutError after timeout_s of the event loop's attention. Under overload the
        loop may be busy elsewhere when the timer is due, while the reply already waits in the socket: a
        timer that fires late by that much gives the reply one more turn (as long as the loop was late,
        LAG_TURNS times at most), so that a busy loop does not pass for a slow Redis."""
        task = asyncio.ensure_future(operation)
        loop = asyncio.get_running_loop()
        budget = self.timeout_s
        for _ in range(1 + LAG_TURNS):
            due = loop.time() + budget
            done, _ = await asyncio.wait({task}, timeout=budget)
            if done:
                return task.result()
            budget = loop.time() - due  # how late the loop woke us: its time busy elsewhere
            if budget < LAG_S:
                break
        task.cancel()
        raise TimeoutError(f"redis did not answer in {1000 * self.timeout_s:.0f} ms")

    async def close(self) -> None:
        await self.client.aclose()


class CacheUnavailable(Exception):
    pass


class Cache:
    """What the pipeline uses: typed values over one store (in-process or Redis), failures absorbed and counted.

    Neighbour entries (an image's embedding, neighbour ids and similarities) are counted as hits, misses and
    errors; label embeddings (zero-shot) count only their errors, so the hit ratio stays the images'."""

    def __init__(self, store: LocalCache | RedisCache, ttl_s: int, metrics: Metrics):
        self.store, self.ttl_s, self.metrics = store, ttl_s, metrics
        self._pending: set[asyncio.Future[bytes | None]] = set()  # writes to Redis under way

    async def get(self, key: str) -> Entry | None:
        try:
            found = await self.store.get(key)
            entry = found if found is None or isinstance(found, Entry) else Entry.unpack(found)
        except CacheUnavailable:
            self.metrics.cache.labels("error").inc()
            return None
        except (ValueError, struct.error):
            entry = None  # an entry in another format: recompute it (and overwrite it)
        self.metrics.cache.labels("hit" if entry is not None else "miss").inc()
        return entry

    def put(self, key: str, entry: Entry) -> None:
        """Write in the background: the answer never waits for the cache. The in-process store keeps the entry
        itself, unpacked (its arrays are the batch's own copies, never written to, as the answers it is shared
        with already are)."""
        self._write(key, entry if isinstance(self.store, LocalCache) else entry.pack())

    async def get_vectors(self, keys: list[str], dim: int) -> list[np.ndarray | None]:
        """float32 (dim,) vectors by key (zero-shot label embeddings); None where absent or unreadable."""
        try:
            blobs = await asyncio.gather(*(self.store.get(key) for key in keys))
        except CacheUnavailable:
            self.metrics.cache.labels("error").inc()
            return [None] * len(keys)
        return [np.frombuffer(b, "<f4") if isinstance(b, bytes) and len(b) == 4 * dim else None for b in blobs]

    def put_vectors(self, keys: list[str], vectors: np.ndarray) -> None:
        """(n, dim) vectors under `keys`, written in the background."""
        for key, vector in zip(keys, vectors, strict=True):
            self._write(key, vector.astype("<f4").tobytes())

    def _write(self, key: str, blob: bytes | Entry) -> None:
        if isinstance(self.store, LocalCache):  # no round trip to wait for
            self.store.put(key, blob, self.ttl_s)
            return
        assert isinstance(blob, bytes)
        written = self.store.put(key, blob, self.ttl_s)  # a future and a callback, not a task: one a request
        self._pending.add(written)
        written.add_done_callback(self._written)

    def _written(self, written: asyncio.Future[bytes | None]) -> None:
        self._pending.discard(written)
        if not written.cancelled() and isinstance(written.exception(), CacheUnavailable):
            self.metrics.cache.labels("error").inc()

    async def start(self) -> None:
        await self.store.start()

    async def written(self) -> None:
        """Wait for the writes in the background to finish."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def close(self) -> None:
        await self.written()
        await self.store.close()
