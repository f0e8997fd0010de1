"""Zero-shot classification over labels named in the request, with RECO's retrieval-refined embeddings.

Image: decode -> (micro-batched, in the zero-shot batcher's worker thread) encode -> search the memory's
key index -> fuse the aligned texts of the k nearest images (TorchScript) -> refined image embedding. The
neighbour cache of /classify is shared: same key, same entry.
Labels: prompt -> tokenizer (the `tokenizers` library) -> text tower (ONNX: no torch for text) -> search the
memory's text index -> fuse the keys of the k nearest texts -> refined label embedding, cached by label,
template and memory version (the same store as the neighbour cache: in-process LRU, or Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np
import onnxruntime as ort
import torch
from tokenizers import Tokenizer

from service import artifacts as A
from service.batching import Batcher
from service.cache import CacheUnavailable, Entry, cache_key
from service.decode import DecodeError, decode
from service.memory import Memory
from service.shards import ShardedMemory

if TYPE_CHECKING:
    from service.pipeline import Pipeline

log = logging.getLogger(__name__)


class LabelError(Exception):
    """Bad labels or template: a 4xx with this message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def load_tokenizer(path: Path, max_tokens: int) -> Tokenizer:
    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(max_tokens)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def check_labels(labels: list[str], template: str, max_labels: int, max_chars: int) -> list[str]:
    """Labels stripped and validated; raises LabelError (422, 413) naming the first problem."""
    if template.count("{}") != 1 or len(template) > 200:
        raise LabelError(422, "template must contain '{}' exactly once and be at most 200 characters")
    if not labels:
        raise LabelError(422, "no labels: send the candidates as repeated multipart field 'labels'")
    if len(labels) > max_labels:
        raise LabelError(413, f"{len(labels)} labels in one request; the limit is {max_labels}")
    out = []
    for n, raw in enumerate(labels):
        label = raw.strip()
        if not label:
            raise LabelError(422, f"label {n} is empty")
        if len(label) > max_chars:
            raise LabelError(422, f"label {n} is {len(label)} characters; the limit is {max_chars}")
        if any(ord(c) < 32 for c in label):
            raise LabelError(422, f"label {n} contains control characters")
        out.append(label)
    if len(set(out)) != len(out):
        raise LabelError(422, "labels must be distinct")
    return out


@dataclass
class ZsJob:
    pixels: np.ndarray | None  # (3, S, S) to encode; None on a cache hit
    cached: Entry | None


@dataclass
class ZsOutput:
    refined: np.ndarray  # (d,) refined image embedding
    entry: Entry  # z, neighbour ids and similarities (what the neighbour cache keeps)
    started: float
    seconds: dict[str, float]


class ZeroShot:
    """The zero-shot parts of one artifact directory, beside the pipeline that owns the encoder and memory."""

    def __init__(self, pipeline: Pipeline, info: A.ZeroShotInfo):
        self.pipeline, self.info = pipeline, info
        # The zero-shot parts index one memory version's items: they serve that version only.
        self.built_for = pipeline.version
        directory, s = pipeline.version.directory, pipeline.settings
        if s.verify_checksums:
            for name in A.ZS_FILES:
                if A.digest(directory / name) != info.files.get(name):
                    raise A.ArtifactError(f"{directory / name} does not match the checksum in {A.MANIFEST}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.tower = ort.InferenceSession(str(directory / A.ZS_TEXT_TOWER), options, providers=["CPUExecutionProvider"])
        self.tokenizer = load_tokenizer(directory / A.ZS_TOKENIZER, info.max_tokens)
        self.text_index = faiss.read_index(str(directory / A.ZS_TEXT_INDEX))
        self.text_order = np.load(directory / A.ZS_TEXT_ORDER)
        self.text_aligned = np.load(directory / A.ZS_TEXT_ALIGNED, mmap_mode="r")  # (N, d) float16
        self.fuse_image = torch.jit.load(str(directory / A.ZS_FUSION_IMAGE), map_location="cpu").eval()
        self.fuse_text = torch.jit.load(str(directory / A.ZS_FUSION_TEXT), map_location="cpu").eval()
        n = self.memory.size
        for what, size in (("text index", self.text_index.ntotal), ("aligned texts", len(self.text_aligned))):
            if size != n:
                raise A.ArtifactError(f"zero-shot {what} holds {size} items, the memory {n}: rebuild")
        if info.dim != self.memory.dim or info.k > pipeline.k:
            raise A.ArtifactError(f"zero-shot parts are {info.dim}-d with k={info.k}: they do not fit this memory")
        self.parts_id = hashlib.blake2b("".join(sorted(info.files.values())).encode(), digest_size=6).hexdigest()
        self.text_worker = ThreadPoolExecutor(1, thread_name_prefix="zs-text")
        self.batcher: Batcher[ZsJob, ZsOutput] = Batcher(
            self.run_batch, s.max_batch, s.max_wait_ms / 1000, pipeline.metrics
        )

    @property
    def memory(self) -> Memory | ShardedMemory:
        return self.built_for.memory

    @classmethod
    def load(cls, pipeline: Pipeline) -> ZeroShot | None:
        info = pipeline.version.manifest.zero_shot
        return None if info is None else cls(pipeline, info)

    def warmup(self, pixels: np.ndarray) -> None:
        """TorchScript optimises a module on its first runs: pay that here, not in the first requests."""
        for n in (1, 2, 1, 2):
            self.run_batch([ZsJob(pixels, None)] * n)
            self.embed_labels(["warm-up"] * n)

    async def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self.text_worker.shutdown(wait=False)

    # ------------------------------------------------------------ images, in the batcher's worker thread

    def run_batch(self, jobs: list[ZsJob]) -> list[ZsOutput]:
        started = time.perf_counter()
        p, k = self.pipeline, self.pipeline.k
        memory = self.memory
        z, sims, ids, misses, encode_s = p.embed(jobs)
        seconds = {"encode": encode_s, "search": 0.0}
        if misses:
            t = time.perf_counter()
            sims[misses], ids[misses] = memory.search(z[misses], k)
            seconds["search"] = time.perf_counter() - t
            p.metrics.stage_seconds.labels("search").observe(seconds["search"])
        t = time.perf_counter()
        nb = ids[:, : self.info.k]
        texts = np.take(self.text_aligned, nb.ravel(), axis=0).reshape(*nb.shape, -1)
        with torch.inference_mode():
            refined = self.fuse_image(torch.from_numpy(z), torch.from_numpy(texts).float()).numpy()
        seconds["fuse_image"] = time.perf_counter() - t
        p.metrics.stage_seconds.labels("zs_fuse_image").observe(seconds["fuse_image"])
        return [
            ZsOutput(refined[i], Entry(z[i].copy(), ids[i].copy(), sims[i].copy()), started, seconds)
            for i in range(len(jobs))
        ]

    # ------------------------------------------------------------ labels, in the text worker thread

    def embed_labels(self, prompts: list[str]) -> np.ndarray:
        """Prompts -> refined label embeddings (n, d): text tower, text search, fusion of neighbour images."""
        enc = self.tokenizer.encode_batch(prompts)
        feeds = {
            "input_ids": np.asarray([e.ids for e in enc], np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in enc], np.int64),
        }
        aligned, search = self.tower.run(None, feeds)
        _, pos = self.text_index.search(np.ascontiguousarray(search, dtype=np.float32), self.info.k)
        images = self.memory.gather(self.text_order[pos], True, False)[0]  # (n, k, d) float16
        with torch.inference_mode():
            refined = self.fuse_text(torch.from_numpy(aligned), torch.from_numpy(images).float())
        return np.asarray(refined.numpy(), np.float32)

    def _label_key(self, label: str, template: str) -> str:
        h = hashlib.blake2b(f"{template}\0{label}".encode(), digest_size=16).hexdigest()
        return f"rac:zs:{self.built_for.id}:{self.parts_id}:{h}"

    async def labels(self, labels: list[str], template: str) -> tuple[np.ndarray, int]:
        """(n, d) refined label embeddings and how many came from the cache."""
        store, d = self.pipeline.cache.store, self.info.dim
        keys = [self._label_key(label, template) for label in labels]
        out = np.empty((len(labels), d), np.float32)
        missing = []
        for i, key in enumerate(keys):
            blob = None
            try:
                blob = await store.get(key)
            except CacheUnavailable:
                self.pipeline.metrics.cache.labels("error").inc()
            if blob is not None and len(blob) == 4 * d:
                out[i] = np.frombuffer(blob, "<f4")
            else:
                missing.append(i)
        if missing:
            prompts = [template.format(labels[i]) for i in missing]
            loop = asyncio.get_running_loop()
            out[missing] = await loop.run_in_executor(self.text_worker, self.embed_labels, prompts)
            for i in missing:
                try:
                    await store.set(keys[i], out[i].astype("<f4").tobytes(), self.pipeline.cache.ttl_s)
                except CacheUnavailable:
                    self.pipeline.metrics.cache.labels("error").inc()
        return out, len(labels) - len(missing)

    # ------------------------------------------------------------ one request, on the event loop

    async def classify(self, data: bytes, labels: list[str], template: str, neighbors: int) -> dict[str, object]:
        """The answer's fields; raises DecodeError for a bad image, Overloaded when the server is full."""
        p = self.pipeline
        t0 = time.perf_counter()
        if p.version is not self.built_for:
            raise LabelError(
                404,
                f"the memory was swapped to version {p.memory_version}, which has no zero-shot parts (they index "
                f"version {self.built_for.id}): build them for it with `rac build --zero-shot`",
            )
        if len(data) > p.settings.max_image_bytes:
            raise DecodeError(413, f"image is {len(data)} bytes; the limit is {p.settings.max_image_bytes}")
        with p.admission.admit(1), self._holding():
            label_task = asyncio.ensure_future(self._timed_labels(labels, template))
            try:
                image, timings = await self._image(data)
            except BaseException:
                label_task.cancel()
                raise
            (label_emb, from_cache), label_s = await label_task
        t = time.perf_counter()
        logits = self.info.scale * label_emb @ image.refined
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        score_s = time.perf_counter() - t
        total = time.perf_counter() - t0
        p.metrics.stage_seconds.labels("zs_labels").observe(label_s)
        p.metrics.stage_seconds.labels("zs_total").observe(total)
        order = np.argsort(-probs, kind="stable")
        timings |= {**image.seconds, "labels": label_s, "score": score_s, "total": total}
        return {
            "predictions": [{"label": labels[i], "probability": float(probs[i])} for i in order],
            "neighbors": self._neighbors(image.entry, neighbors),
            "template": template,
            "cached": {"image": timings.get("decode") is None, "labels": from_cache},
            "timings_ms": {name: round(1000 * s, 3) for name, s in timings.items() if s is not None},
        }

    @contextlib.contextmanager
    def _holding(self) -> Iterator[None]:
        """Hold the memory version for the request, so that a swap never closes it under a batch."""
        self.built_for.acquire()
        try:
            yield
        finally:
            self.built_for.release()

    async def _timed_labels(self, labels: list[str], template: str) -> tuple[tuple[np.ndarray, int], float]:
        t = time.perf_counter()
        result = await self.labels(labels, template)
        return result, time.perf_counter() - t

    async def _image(self, data: bytes) -> tuple[ZsOutput, dict[str, float | None]]:
        p = self.pipeline
        key = cache_key(data, self.built_for.id)
        with self.batcher.coming():  # a batch being gathered may wait for this image, until it is queued
            entry = await p.cache.get(key)
            pixels, decode_s = None, None
            if entry is None:
                t = time.perf_counter()
                try:
                    pixels = await asyncio.get_running_loop().run_in_executor(
                        p.decoder, decode, data, p.spec, p.settings.max_pixels
                    )
                except DecodeError:
                    p.metrics.images.labels("bad_input").inc()
                    raise
                decode_s = time.perf_counter() - t
                p.metrics.stage_seconds.labels("decode").observe(decode_s)
        queued = time.perf_counter()
        out = await self.batcher.submit(ZsJob(pixels, entry))
        if entry is None:
            p.cache.put(key, out.entry)
        wait = max(0.0, out.started - queued)
        p.metrics.stage_seconds.labels("queue").observe(wait)
        p.metrics.images.labels("hit" if entry is not None else "miss").inc()
        return out, {"decode": decode_s, "queue": wait}

    def _neighbors(self, entry: Entry, count: int) -> list[dict[str, object]]:
        ids = [int(i) for i in entry.ids[: min(count, self.info.k)]]
        items = self.memory.items(ids)
        return [{"id": i, "text": items[i].text, "similarity": float(s)} for i, s in zip(ids, entry.sims, strict=False)]
