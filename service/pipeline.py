"""decode -> encode -> search -> head, readable top to bottom.

Per image, on the event loop: admission, cache lookup. Per batch, in the batcher's worker thread: decode and
encode the images the cache did not know, search the memory, gather values, run the head.
Each request holds the memory version it started with (service/versions.py), so its neighbours, attention,
probabilities and `memory_version` all come from one version, even across a swap.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from service import artifacts as A
from service.batching import Admission, Batcher
from service.cache import Entry, LocalCache, NeighbourCache, RedisCache, cache_key
from service.decode import DecodeError, InputSpec, decode
from service.encode import Encoder
from service.head import Head
from service.memory import Item, Memory
from service.metrics import Metrics
from service.settings import Settings, cores
from service.shards import ShardedMemory
from service.versions import Follower, MemoryVersion, OpenMemory, load_version
from service.zeroshot import ZeroShot

log = logging.getLogger(__name__)


class Queued(Protocol):
    """What a batch needs of a queued image: its pixels to encode, or what the cache knew of it."""

    pixels: np.ndarray | None
    cached: Entry | None


@dataclass
class Job:
    pixels: np.ndarray | None  # (3, S, S) float32 to encode; None on a cache hit (or while `data` is set)
    cached: Entry | None
    neighbors: int  # how many neighbours to describe in the answer
    version: MemoryVersion | None = None  # the memory the request holds; None: whichever is served
    data: bytes | None = None  # the encoded image, decoded by the batch (then its pixels)
    decode_s: float = 0.0  # what decoding it cost, in the batch


@dataclass
class Output:
    probs: np.ndarray  # (C,)
    attn: np.ndarray  # (k,) the last layer's attention
    entry: Entry  # z, neighbour ids and similarities (what the cache keeps)
    items: dict[int, Item]
    started: float  # perf_counter when the batch started
    seconds: dict[str, float]  # encode / search / head time of the whole batch
    version: str  # the memory version that produced all of the above


@dataclass
class Classification:
    predictions: list[dict[str, object]]
    neighbors: list[dict[str, object]]
    cached: bool
    memory_version: str
    timings_ms: dict[str, float] = field(default_factory=dict)


class Pipeline:
    def __init__(self, settings: Settings, metrics: Metrics, open_memory: OpenMemory = load_version):
        """Load and cross-check the artifacts; raises ArtifactError naming any mismatch. open_memory: how a
        memory version is opened (load_version: here, memory-mapped; versions.sharded: over shards)."""
        self.settings, self.metrics, self.open_memory = settings, metrics, open_memory
        # A flat artifact directory, or a serving root whose `current` link is followed.
        directory = A.resolve(settings.artifacts)
        self.root = settings.artifacts if directory != settings.artifacts else None
        # The model (encoder, head, classes) is fixed for the life of the process; the memory is versioned.
        self.manifest = m = A.read_manifest(directory)
        self.spec = InputSpec.from_dict(m.encoder.input)
        self.k = m.index.k
        threads = settings.encoder_threads or max(1, cores() // (settings.workers or 1))
        try:  # onnxruntime and torch raise their own types for a damaged file: name the file
            self.encoder = Encoder(directory / A.ENCODER, settings.device, threads, settings.encoder_spin)
        except Exception as e:
            raise A.ArtifactError(f"{directory / A.ENCODER} cannot be loaded: {e}") from e
        self.version = open_memory(directory, settings, None, self.encoder.dim)
        try:
            self.head = Head(directory / A.HEAD, settings.head_threads)
        except Exception as e:
            raise A.ArtifactError(f"{directory / A.HEAD} cannot be loaded: {e}") from e
        self._check()
        metrics.memory_version.labels(self.version.id).set(1)
        self.follower = (
            Follower(self.root, lambda: self.version.directory, self.swap, settings.memory_poll_s, metrics)
            if self.root is not None
            else None
        )
        self.decoder = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self.admission = Admission(settings.max_pending, metrics, settings.max_body_bytes)
        self.batcher: Batcher[Job, Output | DecodeError] = Batcher(
            self.run_batch, settings.max_batch, settings.max_wait_ms / 1000, metrics, settings.batches_in_flight
        )
        store = (
            RedisCache(settings.redis_url, settings.redis_timeout_ms / 1000, settings.redis_retry_s)
            if settings.redis_url
            else LocalCache(settings.cache_entries)
        )
        self.cache = NeighbourCache(store, settings.cache_ttl_s, metrics)
        self.zero_shot = ZeroShot.load(self)  # None where the artifacts were built without --zero-shot

    @property
    def memory_version(self) -> str:
        return self.version.id

    def _check(self) -> None:
        """The head against the manifest (the memory was checked by load_version)."""
        m = self.manifest

        def require(ok: bool, what: str) -> None:
            if not ok:
                raise A.ArtifactError(f"artifacts in {self.settings.artifacts} do not fit together: {what}")

        require(self.head.uses_keys == m.head.uses_keys, "head and manifest disagree on whether the head reads keys")
        probs, attn = self.head(*self._dummy(2, self.version))
        require(
            probs.shape == (2, len(m.classes)), f"head gives {probs.shape[1]} classes, manifest names {len(m.classes)}"
        )
        require(attn.shape == (2, self.k), f"head attends over {attn.shape[1]} neighbours, manifest says k={self.k}")

    def _dummy(self, b: int, version: MemoryVersion) -> tuple[np.ndarray, ...]:
        mem = version.memory
        z = np.zeros((b, mem.dim), np.float32)
        sims = np.zeros((b, self.k), np.float32)
        keys, values = mem.gather(np.zeros((b, self.k), np.int64), self.head.uses_keys, self.head.uses_values)
        return z, sims, keys, values

    # ------------------------------------------------------------ lifecycle

    def warmup(self) -> None:
        """One image decoded and one full batch through encode, search and head, so that the first request
        pays no first-call costs (image plugin loading, onnxruntime's first run)."""
        png = io.BytesIO()
        Image.new("L", (28, 28)).save(png, "PNG")
        pixels = decode(png.getvalue(), self.spec, self.settings.max_pixels)
        self.run_batch([Job(pixels, None, 0)] * min(8, self.settings.max_batch))
        if self.zero_shot is not None:
            self.zero_shot.warmup(pixels)

    async def start(self) -> None:
        self.batcher.start()
        await self.cache.start()
        if self.zero_shot is not None:
            await self.zero_shot.start()
        if self.follower is not None:
            self.follower.start()

    async def stop(self) -> None:
        if self.follower is not None:
            await self.follower.stop()
        await self.batcher.stop()
        if self.zero_shot is not None:
            await self.zero_shot.stop()
        await self.cache.close()
        self.decoder.shutdown(wait=False)
        self.version.retire()

    async def swap(self, directory: Path) -> None:
        """Load `directory` beside the served version, check it against the served model, pre-fault and
        warm it in the batch worker (between two batches), then serve it. Raises ArtifactError."""
        new = await asyncio.to_thread(self.open_memory, directory, self.settings, self.manifest, self.encoder.dim)
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.batcher.worker, self._warm_memory, new)
        except Exception as e:
            new.retire()
            raise A.ArtifactError(f"{directory}: warm-up failed: {e}") from e
        old, self.version = self.version, new  # requests admitted from now on take the new version
        self.metrics.memory_version.labels(old.id).set(0)
        self.metrics.memory_version.labels(new.id).set(1)  # after: the two may hold the same memory
        old.retire()  # closed when the last request holding it is answered

    def _warm_memory(self, version: MemoryVersion) -> None:
        """One batch of searches, gathers and the head over the new memory (its first-call costs)."""
        z, _, _, _ = self._dummy(8, version)
        z[:, 0] = 1.0
        sims, ids = version.memory.search(z, self.k)
        keys, values = version.memory.gather(ids, self.head.uses_keys, self.head.uses_values)
        self.head(z, sims, keys, values)

    # ------------------------------------------------------------ one batch, in the worker thread

    def embed(self, jobs: Sequence[Queued]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int], float]:
        """The cached jobs' embeddings and neighbours, and the other jobs' images encoded in one batch:
        z (B, d), sims (B, k), ids (B, k) (the misses' rows left to search), the misses, encode seconds."""
        misses = [i for i, j in enumerate(jobs) if j.cached is None]
        z = np.empty((len(jobs), self.encoder.dim), np.float32)  # (B, d)
        sims = np.empty((len(jobs), self.k), np.float32)  # (B, k)
        ids = np.empty((len(jobs), self.k), np.int64)  # (B, k)
        for i, j in enumerate(jobs):
            if j.cached is not None:
                z[i], sims[i], ids[i] = j.cached.z, j.cached.sims, j.cached.ids
        encode_s = 0.0
        if misses:
            t = time.perf_counter()
            z[misses] = self.encoder(np.stack([jobs[i].pixels for i in misses]))  # type: ignore[misc]
            encode_s = time.perf_counter() - t
            self.metrics.stage_seconds.labels("encode").observe(encode_s)
        return z, sims, ids, misses, encode_s

    def _decode(self, jobs: list[Job]) -> tuple[list[Job], dict[int, DecodeError]]:
        """Decode the jobs that came as bytes, here in the batch thread: the images are small, and a decode
        costs less than handing it to a pool thread and back. The jobs that decoded, and each other one's
        error by position."""
        errors: dict[int, DecodeError] = {}
        for i, j in enumerate(jobs):
            if j.data is None:
                continue
            t = time.perf_counter()
            try:
                j.pixels = decode(j.data, self.spec, self.settings.max_pixels)
            except DecodeError as e:
                errors[i] = e
            j.decode_s, j.data = time.perf_counter() - t, None
            self.metrics.stage_seconds.labels("decode").observe(j.decode_s)
        return [j for i, j in enumerate(jobs) if i not in errors], errors

    def run_batch(self, jobs: list[Job]) -> list[Output | DecodeError]:
        jobs, errors = self._decode(jobs)
        outputs: list[Output | DecodeError] = list(self._run(jobs))
        for i in sorted(errors):
            outputs.insert(i, errors[i])
        return outputs

    def _run(self, jobs: list[Job]) -> list[Output]:
        started = time.perf_counter()
        z, sims, ids, misses, encode_s = self.embed(jobs)
        seconds = {"encode": encode_s, "search": 0.0, "head": 0.0}
        # The rest per memory version: one group, except in the batch that straddles a swap.
        groups: dict[int, tuple[MemoryVersion, list[int]]] = {}
        for i, j in enumerate(jobs):
            v = j.version or self.version
            groups.setdefault(id(v), (v, []))[1].append(i)
        outputs: list[Output | None] = [None] * len(jobs)
        for v, rows in groups.values():
            mem = v.memory
            keys, values = self._neighbours(mem, jobs, rows, z, sims, ids, seconds)  # fills the misses' sims, ids
            t = time.perf_counter()
            probs, attn = self.head(z[rows], sims[rows], keys, values)
            seconds["head"] += time.perf_counter() - t
            wanted = sorted({int(n) for i in rows if jobs[i].neighbors for n in ids[i]})
            items = mem.items(wanted)
            for r, i in enumerate(rows):
                entry = Entry(z[i].copy(), ids[i].copy(), sims[i].copy())
                outputs[i] = Output(probs[r], attn[r], entry, items, started, seconds, v.id)
        if misses:
            self.metrics.stage_seconds.labels("search").observe(seconds["search"])
        self.metrics.stage_seconds.labels("head").observe(seconds["head"])
        return [o for o in outputs if o is not None]

    def _neighbours(
        self,
        mem: Memory | ShardedMemory,
        jobs: list[Job],
        rows: list[int],
        z: np.ndarray,
        sims: np.ndarray,
        ids: np.ndarray,
        seconds: dict[str, float],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search the rows the cache did not know (their sims and ids written in place, their values found in
        the same call), gather the cached rows' values: keys (R, k, d) and values (R, k, dv) of `rows`. The
        search counts as `search` time, the gathers as `head` time (the head's reads)."""
        search = [r for r, i in enumerate(rows) if jobs[i].cached is None]
        cached = [r for r, i in enumerate(rows) if jobs[i].cached is not None]
        uses_values = self.head.uses_values
        found = np.empty((0, self.k, 0), np.float16)
        t = time.perf_counter()
        if search:
            misses = [rows[r] for r in search]
            sims[misses], ids[misses], found = mem.lookup(z[misses], self.k, uses_values)
        seconds["search"] += time.perf_counter() - t
        t = time.perf_counter()
        if not cached:
            values = found
        else:
            _, known = mem.gather(ids[[rows[r] for r in cached]], False, uses_values)
            values = np.empty((len(rows), self.k, known.shape[-1]), np.float16)  # (R, k, dv)
            values[cached] = known
            if search:
                values[search] = found
        keys = mem.gather(ids[rows], True, False)[0] if self.head.uses_keys else np.empty((len(rows), self.k, 0))
        seconds["head"] += time.perf_counter() - t
        return keys.astype(np.float16), values

    # ------------------------------------------------------------ requests, on the event loop

    async def classify(self, images: list[bytes], top_k: int, neighbors: int) -> list[Classification | DecodeError]:
        """Each image's answer, or its own DecodeError; raises Overloaded when the server is full."""
        with self.admission.admit(len(images)):
            return await asyncio.gather(*(self._one(data, top_k, neighbors) for data in images))

    async def _one(self, data: bytes, top_k: int, neighbors: int) -> Classification | DecodeError:
        t0 = time.perf_counter()
        if len(data) > self.settings.max_image_bytes:
            self.metrics.images.labels("bad_input").inc()
            return DecodeError(413, f"image is {len(data)} bytes; the limit is {self.settings.max_image_bytes}")
        version = self.version.acquire()
        try:
            return await self._classify(data, top_k, neighbors, version, t0)
        finally:
            version.release()

    async def _classify(
        self, data: bytes, top_k: int, neighbors: int, version: MemoryVersion, t0: float
    ) -> Classification | DecodeError:
        key = cache_key(data, version.id, self.k, self.encoder.dim)
        with self.batcher.coming():
            entry = await self.cache.get(key)
            if entry is not None and not self.fits(entry, version):
                self.metrics.cache.labels("stale").inc()  # counted as a hit by the cache: ignore it, recompute
                entry = None
        queued = time.perf_counter()
        job = Job(None, entry, neighbors, version, data if entry is None else None)
        out = await self.batcher.submit(job)
        if isinstance(out, DecodeError):
            self.metrics.images.labels("bad_input").inc()
            return out
        if entry is None:
            self.cache.put(key, out.entry)
        total = time.perf_counter() - t0
        wait = max(0.0, out.started - queued)
        self.metrics.stage_seconds.labels("queue").observe(wait)
        self.metrics.stage_seconds.labels("total").observe(total)
        self.metrics.images.labels("hit" if entry is not None else "miss").inc()
        timings = {"decode": job.decode_s, "queue": wait, **out.seconds, "total": total}
        return Classification(
            predictions=self._predictions(out.probs, top_k),
            neighbors=self._neighbors(out, neighbors),
            cached=entry is not None,
            memory_version=out.version,
            timings_ms={name: round(1000 * s, 3) for name, s in timings.items()},
        )

    def fits(self, entry: Entry, version: MemoryVersion) -> bool:
        """An entry's shape and ids fit this memory (a key collision or another writer's entry does not)."""
        return (
            entry.z.shape == (self.encoder.dim,)
            and entry.ids.shape == entry.sims.shape == (self.k,)
            and bool(((entry.ids >= 0) & (entry.ids < version.memory.size)).all())
        )

    def _predictions(self, probs: np.ndarray, top_k: int) -> list[dict[str, object]]:
        order = np.argsort(-probs, kind="stable")[:top_k]
        classes = self.manifest.classes
        return [{"label": classes[c], "index": int(c), "probability": float(probs[c])} for c in order]

    def _neighbors(self, out: Output, count: int) -> list[dict[str, object]]:
        if count <= 0:
            return []
        ids, sims, attn = out.entry.ids, out.entry.sims, out.attn
        order = np.lexsort((-sims, -attn))[:count]  # by attention weight, then similarity
        classes = self.manifest.classes
        result = []
        for j in order:
            item = out.items[int(ids[j])]
            result.append(
                {
                    "id": item.id,
                    "text": item.text,
                    "source": item.source,
                    "label": classes[item.label],
                    "similarity": float(sims[j]),
                    "attention": float(attn[j]),
                }
            )
        return result
