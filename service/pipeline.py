"""decode -> encode -> search -> head, readable top to bottom.

Per image, on the event loop: admission, cache lookup, decode (thread pool). Per batch, in the batcher's
worker thread: encode the images the cache did not know, search the memory, gather values, run the head.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

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
from service.zeroshot import ZeroShot

log = logging.getLogger(__name__)


@dataclass
class Job:
    pixels: np.ndarray | None  # (3, S, S) float32 to encode; None on a cache hit
    cached: Entry | None
    neighbors: int  # how many neighbours to describe in the answer


@dataclass
class Output:
    probs: np.ndarray  # (C,)
    attn: np.ndarray  # (k,) the last layer's attention
    entry: Entry  # z, neighbour ids and similarities (what the cache keeps)
    items: dict[int, Item]
    started: float  # perf_counter when the batch started
    seconds: dict[str, float]  # encode / search / head time of the whole batch


@dataclass
class Classification:
    predictions: list[dict[str, object]]
    neighbors: list[dict[str, object]]
    cached: bool
    timings_ms: dict[str, float] = field(default_factory=dict)


class Pipeline:
    def __init__(self, settings: Settings, metrics: Metrics):
        """Load and cross-check the artifacts; raises ArtifactError naming any mismatch."""
        self.settings, self.metrics = settings, metrics
        directory = settings.artifacts
        self.manifest = A.read_manifest(directory)
        if settings.verify_checksums:
            A.verify_files(directory, self.manifest)
        m = self.manifest
        self.spec = InputSpec.from_dict(m.encoder.input)
        self.k = m.index.k
        threads = settings.encoder_threads or max(1, cores() // (settings.workers or 1))
        self.encoder = Encoder(directory / A.ENCODER, settings.device, threads, settings.encoder_spin)
        self.memory = Memory(directory, m.index.nprobe, settings.search_threads)
        self.head = Head(directory / A.HEAD, settings.head_threads)
        self._check()
        self.decoder = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self.admission = Admission(settings.max_pending, metrics)
        self.batcher: Batcher[Job, Output] = Batcher(
            self.run_batch, self.admission, settings.max_batch, settings.max_wait_ms / 1000, metrics
        )
        store = (
            RedisCache(settings.redis_url, settings.redis_timeout_ms / 1000, settings.redis_retry_s)
            if settings.redis_url
            else LocalCache(settings.cache_entries)
        )
        self.cache = NeighbourCache(store, settings.cache_ttl_s, metrics)
        self.zero_shot = ZeroShot.load(self)  # None where the artifacts were built without --zero-shot

    def _check(self) -> None:
        m, mem = self.manifest, self.memory

        def require(ok: bool, what: str) -> None:
            if not ok:
                raise A.ArtifactError(f"artifacts in {self.settings.artifacts} do not fit together: {what}")

        require(
            self.encoder.dim == m.encoder.dim, f"encoder outputs {self.encoder.dim}-d, manifest says {m.encoder.dim}"
        )
        require(mem.dim == self.encoder.dim, f"index is {mem.dim}-d, encoder outputs {self.encoder.dim}-d")
        require(mem.size == m.memory.size, f"index holds {mem.size} items, manifest says {m.memory.size}")
        require(mem.n_items == mem.size, f"item table holds {mem.n_items} rows, index {mem.size}")
        require(mem.keys.shape == (mem.size, mem.dim), f"keys are {mem.keys.shape}, expected ({mem.size}, {mem.dim})")
        dv = m.memory.value_dim
        require(mem.values.shape == (mem.size, dv), f"values are {mem.values.shape}, expected ({mem.size}, {dv})")
        require(0 < self.k <= mem.size, f"k={self.k} with {mem.size} memory items")
        require(self.head.uses_keys == m.head.uses_keys, "head and manifest disagree on whether the head reads keys")
        probs, attn = self.head(*self._dummy(2))
        require(
            probs.shape == (2, len(m.classes)), f"head gives {probs.shape[1]} classes, manifest names {len(m.classes)}"
        )
        require(attn.shape == (2, self.k), f"head attends over {attn.shape[1]} neighbours, manifest says k={self.k}")

    def _dummy(self, b: int) -> tuple[np.ndarray, ...]:
        mem = self.memory
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
        if self.zero_shot is not None:
            await self.zero_shot.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        if self.zero_shot is not None:
            await self.zero_shot.stop()
        await self.cache.close()
        self.decoder.shutdown(wait=False)
        self.memory.close()

    # ------------------------------------------------------------ one batch, in the worker thread

    def run_batch(self, jobs: list[Job]) -> list[Output]:
        started = time.perf_counter()
        seconds = {"encode": 0.0, "search": 0.0}
        misses = [i for i, j in enumerate(jobs) if j.cached is None]
        z = np.empty((len(jobs), self.memory.dim), np.float32)  # (B, d)
        sims = np.empty((len(jobs), self.k), np.float32)  # (B, k)
        ids = np.empty((len(jobs), self.k), np.int64)  # (B, k)
        for i, j in enumerate(jobs):
            if j.cached is not None:
                z[i], sims[i], ids[i] = j.cached.z, j.cached.sims, j.cached.ids
        if misses:
            t = time.perf_counter()
            z[misses] = self.encoder(np.stack([jobs[i].pixels for i in misses]))  # type: ignore[misc]
            seconds["encode"] = time.perf_counter() - t
            t = time.perf_counter()
            sims[misses], ids[misses] = self.memory.search(z[misses], self.k)
            seconds["search"] = time.perf_counter() - t
            self.metrics.stage_seconds.labels("encode").observe(seconds["encode"])
            self.metrics.stage_seconds.labels("search").observe(seconds["search"])
        t = time.perf_counter()
        keys, values = self.memory.gather(ids, self.head.uses_keys, self.head.uses_values)
        probs, attn = self.head(z, sims, keys, values)
        seconds["head"] = time.perf_counter() - t
        self.metrics.stage_seconds.labels("head").observe(seconds["head"])
        wanted = sorted({int(n) for i, j in enumerate(jobs) for n in ids[i][: self.k] if j.neighbors})
        items = self.memory.items(wanted)
        return [
            Output(probs[i], attn[i], Entry(z[i].copy(), ids[i].copy(), sims[i].copy()), items, started, seconds)
            for i in range(len(jobs))
        ]

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
        key = cache_key(data, self.manifest.memory_version)
        entry = await self.cache.get(key)
        pixels, decode_s = None, 0.0
        if entry is None:
            loop = asyncio.get_running_loop()
            t = time.perf_counter()
            try:
                pixels = await loop.run_in_executor(self.decoder, decode, data, self.spec, self.settings.max_pixels)
            except DecodeError as e:
                self.metrics.images.labels("bad_input").inc()
                return e
            decode_s = time.perf_counter() - t
            self.metrics.stage_seconds.labels("decode").observe(decode_s)
        queued = time.perf_counter()
        out = await self.batcher.submit(Job(pixels, entry, neighbors))
        if entry is None:
            self.cache.put(key, out.entry)
        total = time.perf_counter() - t0
        wait = max(0.0, out.started - queued)
        self.metrics.stage_seconds.labels("queue").observe(wait)
        self.metrics.stage_seconds.labels("total").observe(total)
        self.metrics.images.labels("hit" if entry is not None else "miss").inc()
        timings = {"decode": decode_s, "queue": wait, **out.seconds, "total": total}
        return Classification(
            predictions=self._predictions(out.probs, top_k),
            neighbors=self._neighbors(out, neighbors),
            cached=entry is not None,
            timings_ms={name: round(1000 * s, 3) for name, s in timings.items()},
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
