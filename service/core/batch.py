"""One batch, in the batcher's worker thread: decode -> encode -> search -> each image's head.

Images the cache knew skip decode, encode and search. Both heads read the same batch: the classifier
(TorchScript, over the neighbours' values) and the zero-shot fusion (over the neighbours' aligned texts).
Each job holds the memory version its request took, so its neighbours, values and answer come from that
one version; a batch that straddles a swap runs each version's jobs against their own memory. Jobs with a
filter are searched among the items it lets through: one search per version and filter in the batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from service.core.cache import Entry
from service.core.decode import InputSpec, decode
from service.core.encode import Encoder
from service.core.head import Head
from service.core.zero_shot import ZeroShot
from service.errors import RequestError
from service.memory.filters import Selection
from service.memory.items import Item
from service.memory.versions import MemoryVersion
from service.metrics import Metrics


@dataclass
class Job:
    """One image of a request, as the batch sees it."""

    data: bytes | None  # the encoded image, decoded by the batch; None on a cache hit (or given `pixels`)
    cached: Entry | None  # what the cache knew: the batch skips decode, encode and search
    version: MemoryVersion  # the memory the request holds
    zero_shot: bool = False  # which head reads it: the classifier, or the zero-shot fusion
    neighbors: int = 0  # how many neighbours its answer describes
    selection: Selection | None = None  # the request's filter, resolved against `version`; None: every item
    pixels: np.ndarray | None = None  # (3, S, S) float32, once decoded
    decode_s: float = 0.0  # what decoding it cost, in the batch


@dataclass
class Neighbors:
    """The neighbours an answer describes, in the order it lists them."""

    ids: np.ndarray  # (m,) int64 memory ids
    sims: np.ndarray  # (m,) float32 cosine similarity to the query
    attention: np.ndarray  # (m,) float32 the classifier's last-layer attention (zero-shot: zeros)
    items: list[Item] = field(default_factory=list)  # the item behind each id


@dataclass
class Computed:
    """What a batch computed for one job."""

    entry: Entry  # z, the ids and similarities of the n neighbours read (what the cache keeps)
    scores: np.ndarray  # classifier: class probabilities (C,); zero-shot: the refined image embedding (d,)
    neighbors: Neighbors
    started: float  # perf_counter when the batch started
    seconds: dict[str, float]  # the batch's stages: encode, search, and head or fuse_image


def width(k: int, selection: Selection | None) -> int:
    """Neighbours read: k, or every item that passes a filter that lets fewer than k through."""
    return k if selection is None else min(k, selection.count)


class BatchRunner:
    """The worker-thread part of the pipeline: arrays in, arrays out."""

    def __init__(
        self,
        encoder: Encoder,
        head: Head,
        zero_shot: ZeroShot | None,
        spec: InputSpec,
        k: int,
        max_pixels: int,
        metrics: Metrics,
    ):
        self.encoder, self.head, self.zero_shot = encoder, head, zero_shot
        self.spec, self.k, self.max_pixels, self.metrics = spec, k, max_pixels, metrics

    def __call__(self, jobs: list[Job]) -> list[Computed | RequestError]:
        """Each job's result, or the RequestError its image earned (a bad image fails alone)."""
        results: list[Computed | RequestError | None] = [None] * len(jobs)
        for i, j in enumerate(jobs):
            if j.data is None:
                continue
            t = time.perf_counter()
            try:
                j.pixels = decode(j.data, self.spec, self.max_pixels)
            except RequestError as e:
                results[i] = e
            j.decode_s, j.data = time.perf_counter() - t, None
            self.metrics.stage_seconds.labels("decode").observe(j.decode_s)
        good = [i for i, r in enumerate(results) if r is None]
        for i, computed in zip(good, self.run([jobs[i] for i in good]), strict=True):
            results[i] = computed
        return [r for r in results if r is not None]

    def embed(self, jobs: list[Job]) -> tuple[np.ndarray, np.ndarray, float]:
        """The cached jobs' vectors, the others' images encoded in one call: z (B, d) search keys, q (B, dq)
        what the classifier reads (z itself, unless the build fine-tuned a query output); encode seconds."""
        misses = [i for i, j in enumerate(jobs) if j.cached is None]
        z = np.empty((len(jobs), self.encoder.dim), np.float32)  # (B, d)
        q = z if self.encoder.query_name is None else np.empty((len(jobs), self.encoder.query_dim), np.float32)
        for i, j in enumerate(jobs):
            if j.cached is not None:
                z[i] = j.cached.z
                if q is not z:  # the pipeline's fits() saw to it that a fine-tuned build's entry has its query
                    q[i] = j.cached.query
        encode_s = 0.0
        if misses:
            t = time.perf_counter()
            z[misses], q[misses] = self.encoder.both(np.stack([jobs[i].pixels for i in misses]))  # type: ignore[misc]
            encode_s = time.perf_counter() - t
            self.metrics.stage_seconds.labels("encode").observe(encode_s)
        return z, q, encode_s

    def run(self, jobs: list[Job]) -> list[Computed]:
        """Jobs with pixels or a cache entry -> their results."""
        started = time.perf_counter()
        z, q, encode_s = self.embed(jobs)
        seconds = {"encode": encode_s, "search": 0.0, "head": 0.0, "fuse_image": 0.0}
        out: list[Computed | None] = [None] * len(jobs)
        # One group per memory version and filter: one, except in the batch that straddles a swap or mixes
        # filters.
        groups: dict[tuple[int, str], list[int]] = {}
        for i, j in enumerate(jobs):
            groups.setdefault((id(j.version), j.selection.key if j.selection is not None else ""), []).append(i)
        for rows in groups.values():
            group = self._group([jobs[i] for i in rows], z[rows], None if q is z else q[rows], started, seconds)
            for i, computed in zip(rows, group, strict=True):
                out[i] = computed
        if any(j.cached is None for j in jobs):
            self.metrics.stage_seconds.labels("search").observe(seconds["search"])
        if seconds["head"]:
            self.metrics.stage_seconds.labels("head").observe(seconds["head"])
        if seconds["fuse_image"]:
            self.metrics.stage_seconds.labels("zs_fuse_image").observe(seconds["fuse_image"])
        return [c for c in out if c is not None]

    def _group(
        self, jobs: list[Job], z: np.ndarray, q: np.ndarray | None, started: float, seconds: dict[str, float]
    ) -> list[Computed]:
        """Jobs of one memory version and one filter: search the ones the cache did not know (their values
        found in the same call), gather the cached ones' values, run each job's head (the classifier reads q,
        a fine-tuned build's query vectors, where given, else z). The search counts as `search` time, the
        gathers as `head` time (the head's reads)."""
        version, selection = jobs[0].version, jobs[0].selection
        n = width(self.k, selection)
        sims = np.empty((len(jobs), n), np.float32)  # (R, n)
        ids = np.empty((len(jobs), n), np.int64)  # (R, n)
        search = [r for r, j in enumerate(jobs) if j.cached is None]
        cached = [r for r, j in enumerate(jobs) if j.cached is not None]
        for r in cached:
            entry = jobs[r].cached
            assert entry is not None
            sims[r], ids[r] = entry.sims, entry.ids
        classify = [r for r, j in enumerate(jobs) if not j.zero_shot]
        wanted = self.head.uses_values and bool(classify)
        mem = version.memory
        values = np.empty((len(jobs), n, mem.value_dim if wanted else 0), np.float16)  # (R, n, dv)
        t = time.perf_counter()
        if search:
            sims[search], ids[search], values[search] = mem.lookup(z[search], self.k, wanted, selection)
        seconds["search"] += time.perf_counter() - t
        scores: list[np.ndarray] = [np.empty(0, np.float32)] * len(jobs)
        attention = np.zeros((len(jobs), n), np.float32)  # (R, n)
        if classify:
            t = time.perf_counter()
            known = [r for r in cached if r in set(classify)]
            if wanted and known:
                values[known] = mem.gather(ids[known], False, True)[1]
            keys = (
                mem.gather(ids[classify], True, False)[0]
                if self.head.uses_keys
                else np.empty((len(classify), n, 0), np.float16)
            )
            query = z if q is None else q
            probs, attention[classify] = self.head(query[classify], sims[classify], keys, values[classify])
            for i, r in enumerate(classify):
                scores[r] = probs[i]
            seconds["head"] += time.perf_counter() - t
        fuse = [r for r, j in enumerate(jobs) if j.zero_shot]
        if fuse:
            assert self.zero_shot is not None  # a zero-shot request is refused before, where there is none
            t = time.perf_counter()
            refined = self.zero_shot.fuse_image(z[fuse], ids[fuse], version)
            for i, r in enumerate(fuse):
                scores[r] = refined[i]
            seconds["fuse_image"] += time.perf_counter() - t
        described = self._describe(jobs, version, sims, ids, attention)
        return [
            Computed(
                Entry(z[r].copy(), ids[r].copy(), sims[r].copy(), None if q is None else q[r].copy()),
                scores[r],
                described[r],
                started,
                seconds,
            )
            for r in range(len(jobs))
        ]

    def _describe(
        self, jobs: list[Job], version: MemoryVersion, sims: np.ndarray, ids: np.ndarray, attention: np.ndarray
    ) -> list[Neighbors]:
        """The neighbours each answer lists: the classifier's by attention weight (then similarity), the
        zero-shot head's the first of those its fusion read, by similarity; their items from the version."""
        none = Neighbors(np.empty(0, np.int64), np.empty(0, np.float32), np.empty(0, np.float32))
        out = [none] * len(jobs)
        picked: dict[int, np.ndarray] = {}
        for r, j in enumerate(jobs):
            if j.neighbors <= 0:
                continue
            if j.zero_shot:
                assert self.zero_shot is not None
                picked[r] = np.arange(min(j.neighbors, self.zero_shot.info.k, ids.shape[1]))
            else:
                picked[r] = np.lexsort((-sims[r], -attention[r]))[: j.neighbors]
        if picked:
            wanted = sorted({int(ids[r, c]) for r, cols in picked.items() for c in cols})
            items = version.memory.table.items(wanted)
            for r, cols in picked.items():
                chosen = ids[r, cols]
                out[r] = Neighbors(chosen, sims[r, cols], attention[r, cols], [items[int(i)] for i in chosen])
        return out
