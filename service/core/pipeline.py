"""decode -> encode -> search -> head, readable top to bottom; the one pipeline every front-end calls.

Per request, on the event loop: admission, the memory version it holds, each image's cache lookup. Per
batch, in the batcher's worker thread (service/core/batch.py): decode and encode the images the cache did
not know, search the memory, then each image's head: the classifier, or the zero-shot fusion. A request's
images hold one memory version, so its neighbours, probabilities and `memory_version` all come from that
version, even across a swap. Answers are arrays; each front-end encodes them as its wire format wants.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from service.artifacts import ENCODER, HEAD, ArtifactError, read_manifest, resolve
from service.core.batch import BatchRunner, Computed, Job, Neighbors, width
from service.core.batching import GAUGE_PERIOD_S, Admission, Batcher, cancel
from service.core.cache import Cache, Entry, LocalCache, Recent, RedisCache, cache_key, label_key
from service.core.decode import InputSpec, decode
from service.core.encode import Encoder
from service.core.head import Head
from service.core.memories import Memories
from service.core.zero_shot import ZeroShot, softmax_scores
from service.errors import RequestError
from service.memory.filters import Filter, Selection
from service.memory.versions import MemoryVersion, OpenMemory, load_version
from service.metrics import Metrics
from service.settings import Settings, cores

log = logging.getLogger(__name__)

NO_FILTER = Filter()
Found = tuple[Computed, dict[str, float], bool]  # what the batch computed, the times it waited, a cache hit
NOT_RUN = {"encode": 0.0, "search": 0.0, "head": 0.0, "fuse_image": 0.0}  # the stages of an answer given again
NO_ZERO_SHOT = (
    "these artifacts have no zero-shot parts: rebuild them with `rac build --zero-shot --out DIR` "
    "(`--quick` for a small one)"
)


@dataclass
class Answer:
    """One image's answer."""

    probs: np.ndarray  # (C,) every class's probability (zero-shot: (L,) every label's), in their given order
    neighbors: Neighbors  # the neighbours the answer describes
    neighbors_used: int  # how many the head read: k, or fewer where fewer items pass the request's filter
    memory: str  # the named memory that answered
    memory_version: str  # the version that answered (the one the request held)
    cached: bool  # the neighbours came from the cache: decode, encode and search were skipped
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class ZeroShotAnswers:
    """A zero-shot request's answers, one per image (or the RequestError an image earned), and how many of
    its label embeddings came from the cache."""

    answers: list[Answer | RequestError]
    labels_cached: int


class Pipeline:
    def __init__(self, settings: Settings, metrics: Metrics, open_memory: OpenMemory = load_version):
        """Load and cross-check the artifacts; raises ArtifactError naming any mismatch. open_memory: how a
        memory version is opened (load_version: here, memory-mapped; versions.sharded: over shards)."""
        self.settings, self.metrics = settings, metrics
        # The model (encoder, head, classes) is read from the first named memory's version directory and is
        # fixed for the life of the process; every memory is versioned, and all of them fit this model.
        directory = resolve(settings.named_memories()[0][1])
        self.manifest = m = read_manifest(directory)
        self.spec = InputSpec.from_dict(m.encoder.input)
        self.k = m.index.k
        threads = settings.encoder_threads or max(1, cores() // (settings.workers or 1))
        try:  # onnxruntime and torch raise their own types for a damaged file: name the file
            self.encoder = Encoder(directory / ENCODER, settings.device, threads, settings.encoder_spin)
            self.head = Head(directory / HEAD, settings.head_threads)
        except Exception as e:
            raise ArtifactError(f"{directory}: the encoder or the head cannot be loaded: {e}") from e
        # In the cache key of a fine-tuned build: builds sharing a memory may differ in their query vectors.
        self.query_id = m.files.get(ENCODER, "?")[:12] if m.encoder.query is not None else ""
        zs = m.zero_shot  # the zero-shot model parts, where the artifacts were built with --zero-shot
        self.zero_shot = None if zs is None else ZeroShot(directory, zs, settings.verify_checksums)
        self.memories = Memories(settings, metrics, open_memory, m, self.encoder.dim, self._warm)
        try:
            self._check()
        except ArtifactError:
            self.memories.close()
            raise
        self.admission = Admission(
            settings.max_pending, metrics, settings.max_body_bytes, settings.max_queue_s, settings.max_waiting
        )
        self.run_batch = BatchRunner(
            self.encoder, self.head, self.zero_shot, self.spec, self.k, settings.max_pixels, metrics
        )
        self.batcher: Batcher[Job, Computed | RequestError] = Batcher(
            self.run_batch, settings.max_batch, settings.max_wait_ms / 1000, metrics, settings.batches_in_flight
        )
        self.text_worker = ThreadPoolExecutor(1, thread_name_prefix="labels")  # zero-shot labels, beside the batch
        store = (
            RedisCache(settings.redis_url, settings.redis_timeout_ms / 1000, settings.redis_retry_s)
            if settings.redis_url
            else LocalCache(settings.cache_entries)
        )
        self.cache = Cache(store, settings.cache_ttl_s, metrics)
        # (cache key, neighbours described, zero-shot) -> what the batch computed, its stage times zeroed
        self.answers: Recent[Computed] = Recent(settings.answer_cache_entries)
        self._reporter: asyncio.Task[None] | None = None  # writes the admission gauges (start() to stop())

    @property
    def version(self) -> MemoryVersion:
        """The version the default memory serves now."""
        return self.memories.get(None).version

    def zero_shot_missing(self, memory: str | None = None) -> str | None:
        """None where zero-shot classification is served now over `memory` (None: the default); else why
        not (no zero-shot parts in the artifacts, or the memory version served has none for this model)."""
        if self.zero_shot is None:
            return NO_ZERO_SHOT
        return self.zero_shot.missing(self.memories.get(memory).version)

    def holding(self, memory: str | None = None) -> contextlib.AbstractContextManager[MemoryVersion]:
        """The version `memory` (None: the default) serves now, held for the block: a swap never closes it
        under its user. RequestError 404 for a memory the server does not have."""
        return self.memories.get(memory).holding()

    def _check(self) -> None:
        """The head (and the zero-shot parts) against the manifest (the memory was checked by load_version)."""
        m = self.manifest

        def require(ok: bool, what: str) -> None:
            if not ok:
                raise ArtifactError(f"artifacts in {self.settings.artifacts} do not fit together: {what}")

        require(self.head.uses_keys == m.head.uses_keys, "head and manifest disagree on whether the head reads keys")
        tuned = self.encoder.query_name is not None  # a fine-tuned build: the head reads the graph's `query`
        require(tuned == (m.encoder.query is not None), "encoder and manifest disagree on a fine-tuned query output")
        z, sims = np.zeros((2, self.encoder.query_dim), np.float32), np.zeros((2, self.k), np.float32)
        some = np.full((2, self.k), self.version.memory.filters.ids[0], np.int64)  # (2, k): an id it holds
        keys, values = self.version.memory.gather(some, self.head.uses_keys, True)
        probs, attn = self.head(z, sims, keys, values)
        require(
            probs.shape == (2, len(m.classes)), f"head gives {probs.shape[1]} classes, manifest names {len(m.classes)}"
        )
        require(attn.shape == (2, self.k), f"head attends over {attn.shape[1]} neighbours, manifest says k={self.k}")
        zs = m.zero_shot
        if zs is not None:
            require(zs.dim == self.version.memory.dim and zs.k <= self.k, f"zero-shot parts are {zs.dim}-d, k={zs.k}")

    # ------------------------------------------------------------ lifecycle

    def warmup(self) -> None:
        """One image decoded and full batches through encode, search and each head, so that the first
        request pays no first-call costs (image plugin loading, onnxruntime's first run, TorchScript's
        optimising runs)."""
        png = io.BytesIO()
        Image.new("L", (28, 28)).save(png, "PNG")
        version = self.version
        pixels = decode(png.getvalue(), self.spec, self.settings.max_pixels)  # raises: the settings refuse it
        self.run_batch([Job(png.getvalue(), None, version)] * min(8, self.settings.max_batch))
        if self.zero_shot is not None and self.zero_shot.missing(version) is None:
            for n in (1, 2, 1, 2):
                self.run_batch([Job(None, None, version, zero_shot=True, pixels=pixels)] * n)
                self.zero_shot.embed_labels(["warm-up"] * n, version)

    async def start(self) -> None:
        self.batcher.start()
        await self.cache.start()
        self.memories.start()
        self._reporter = asyncio.get_running_loop().create_task(self._report())

    async def stop(self) -> None:
        await cancel(self._reporter)
        self.admission.report()
        await self.memories.stop()
        await self.batcher.stop()
        self.text_worker.shutdown(wait=False)
        await self.cache.close()
        self.memories.close()

    async def _report(self) -> None:
        while True:
            self.admission.report()
            self.metrics.flush()
            await asyncio.sleep(GAUGE_PERIOD_S)

    async def _warm(self, version: MemoryVersion) -> None:
        """A new version's first-call costs, paid in the batch worker between two batches: one batch of
        searches, gathers and the head."""
        await asyncio.get_running_loop().run_in_executor(self.batcher.worker, self._warm_memory, version)

    def _warm_memory(self, version: MemoryVersion) -> None:
        z = np.zeros((8, version.memory.dim), np.float32)
        z[:, 0] = 1.0
        sims, ids = version.memory.search(z, self.k)
        q = None if self.encoder.query_name is None else np.ones(self.encoder.query_dim, np.float32)
        self.run_batch.run([Job(None, Entry(z[i], ids[i], sims[i], q), version) for i in range(len(z))])

    # ------------------------------------------------------------ requests, on the event loop

    async def classify(
        self, images: list[bytes], neighbors: int, only: Filter = NO_FILTER, memory: str | None = None
    ) -> list[Answer | RequestError]:
        """Each image's answer (every class's probability, `neighbors` neighbours described), its neighbours
        found in `memory` (None: the default) among the items `only` lets through, or the RequestError its
        image earned. Raises RequestError 404 for a memory the server does not have, 422 for a filter naming
        what the memory does not have, Overloaded when the server is full."""
        with self.admission.admit(len(images)), self.holding(memory) as version:
            selection = self.select(version, only)
            if len(images) == 1:  # most requests: no task and no gather
                found = [await self._image(images[0], version, False, neighbors, selection)]
            else:
                found = await asyncio.gather(*(self._image(d, version, False, neighbors, selection) for d in images))
        return [f if isinstance(f, RequestError) else self._answer(f, version, "head", "total") for f in found]

    async def zero_shot_classify(
        self,
        images: list[bytes],
        labels: list[str],
        template: str,
        neighbors: int,
        only: Filter = NO_FILTER,
        memory: str | None = None,
    ) -> ZeroShotAnswers:
        """Each image scored among `labels` (checked by the caller with check_labels) put in `template`.
        Raises RequestError 404 where the memory served has no zero-shot parts for this model, Overloaded
        when the server is full."""
        zs = self.zero_shot
        if zs is None:
            raise RequestError(404, NO_ZERO_SHOT)
        with self.admission.admit(len(images)), self.holding(memory) as version:
            if (why := zs.missing(version)) is not None:
                raise RequestError(404, why)
            selection = self.select(version, only)
            t = time.perf_counter()
            label_task = asyncio.ensure_future(self._labels(zs, labels, template, version))
            try:
                found = await asyncio.gather(*(self._image(d, version, True, neighbors, selection) for d in images))
            except BaseException:
                label_task.cancel()
                raise
            embeddings, labels_cached = await label_task
            label_s = time.perf_counter() - t  # from the request's start: it ran beside the images
        self.metrics.stage_seconds.labels("zs_labels").observe(label_s)

        def score(refined: np.ndarray) -> np.ndarray:
            return softmax_scores(embeddings, refined, zs.info.scale)

        answers = [
            f
            if isinstance(f, RequestError)
            else self._answer(f, version, "fuse_image", "zs_total", score, {"labels": label_s})
            for f in found
        ]
        return ZeroShotAnswers(answers, labels_cached)

    def _answer(
        self,
        found: Found,
        version: MemoryVersion,
        head: str,
        total_stage: str,
        rescore: Callable[[np.ndarray], np.ndarray] | None = None,
        extra: dict[str, float] | None = None,
    ) -> Answer:
        """What the batch computed for one image, as its answer: the head's scores (zero-shot: `rescore`d
        against the labels), its neighbours, where they came from, and each stage's milliseconds."""
        computed, timings, cached = found
        scores, stages = computed.scores, computed.seconds  # the batch's stages: encode, search, its own head's
        ms = {
            "decode": _ms(timings["decode"]),
            "queue": _ms(timings["queue"]),
            "encode": _ms(stages["encode"]),
            "search": _ms(stages["search"]),
            head: _ms(stages[head]),
        }
        for name, seconds in (extra or {}).items():
            ms[name] = _ms(seconds)
        if rescore is not None:
            t = time.perf_counter()
            scores = rescore(scores)
            ms["score"] = _ms(time.perf_counter() - t)
        total = time.perf_counter() - timings["start"]
        ms["total"] = _ms(total)
        self.metrics.stage_seconds.labels(total_stage).observe(total)
        used = len(computed.entry.ids)
        return Answer(scores, computed.neighbors, used, version.name, version.id, cached, ms)

    def select(self, version: MemoryVersion, only: Filter) -> Selection | None:
        """The request's filter resolved against the version it holds (None: no filter); RequestError 422 for
        a source or tag the memory does not have, or a filter no item passes."""
        if not only:
            return None
        selection = version.memory.select(only)
        if selection.count == 0:
            raise RequestError(422, f"no item of memory version {version.id} passes the filter")
        return selection

    async def _image(
        self, data: bytes, version: MemoryVersion, zero_shot: bool, neighbors: int, selection: Selection | None
    ) -> Found | RequestError:
        """One image through the cache and the batch: what the batch computed, the times it waited (start,
        decode, queue), and whether the cache knew it; or the RequestError it earned."""
        t0 = time.perf_counter()
        if len(data) > self.settings.max_image_bytes:
            self.metrics.images.labels("bad_input", version.name).inc()
            return RequestError(413, f"image is {len(data)} bytes; the limit is {self.settings.max_image_bytes}")
        # Both heads read the same entry; a filter's neighbours are its own; the key names the memory.
        only = selection.key if selection is not None else ""
        key = cache_key(data, version.name, version.id, self.k, self.encoder.dim, only, self.query_id)
        recent = (key, neighbors, zero_shot)
        if (known := self.answers.get(recent)) is not None:
            self.metrics.cache.labels("hit").inc()
            self.metrics.images.labels("hit", version.name).inc()
            return known, {"start": t0, "decode": 0.0, "queue": 0.0}, True
        with self.batcher.coming():  # a batch being gathered may wait for this image, until it is queued
            entry = await self.cache.get(key)
            if entry is not None and not self.fits(entry, version, selection):
                self.metrics.cache.labels("stale").inc()  # counted as a hit by the cache: ignore it, recompute
                entry = None
        queued = time.perf_counter()
        job = Job(data if entry is None else None, entry, version, zero_shot, neighbors, selection)
        out = await self.batcher.submit(job)
        if isinstance(out, RequestError):
            self.metrics.images.labels("bad_input", version.name).inc()
            return out
        if entry is None:
            self.cache.put(key, out.entry)
        self.answers.put(recent, Computed(out.entry, out.scores, out.neighbors, out.started, NOT_RUN))
        wait = max(0.0, out.started - queued)
        self.metrics.stage_seconds.labels("queue").observe(wait)
        self.metrics.images.labels("hit" if entry is not None else "miss", version.name).inc()
        return out, {"start": t0, "decode": job.decode_s, "queue": wait}, entry is not None

    async def _labels(
        self, zs: ZeroShot, labels: list[str], template: str, version: MemoryVersion
    ) -> tuple[np.ndarray, int]:
        """(L, d) refined label embeddings, in the order of `labels`, and how many came from the cache."""
        keys = [label_key(label, template, version.id, zs.parts_id) for label in labels]
        found = await self.cache.get_vectors(keys, zs.info.dim)
        out = np.empty((len(labels), zs.info.dim), np.float32)  # (L, d)
        missing = [i for i, v in enumerate(found) if v is None]
        for i, v in enumerate(found):
            if v is not None:
                out[i] = v
        if missing:
            prompts = [template.format(labels[i]) for i in missing]
            loop = asyncio.get_running_loop()
            out[missing] = await loop.run_in_executor(self.text_worker, zs.embed_labels, prompts, version)
            self.cache.put_vectors([keys[i] for i in missing], out[missing])
        return out, len(labels) - len(missing)

    def fits(self, entry: Entry, version: MemoryVersion, selection: Selection | None = None) -> bool:
        """An entry's shape and ids fit this memory and filter (a key collision or another writer's entry
        does not)."""
        n = width(self.k, selection)
        query = None if self.encoder.query_name is None else (self.encoder.query_dim,)
        return (
            entry.z.shape == (self.encoder.dim,)
            and (None if entry.query is None else entry.query.shape) == query
            and entry.ids.shape == entry.sims.shape == (n,)
            and version.memory.contains(entry.ids)
        )


def _ms(seconds: float) -> float:
    """Milliseconds to the microsecond (round(x, 3) costs several times more: it goes through decimal digits)."""
    return int(1e6 * seconds + 0.5) / 1e3
