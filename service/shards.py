"""A memory shard (a contiguous id range of a memory, sharing its trained index) and the merge of the shards'
answers into the global top k: what a sharded deployment's ingress does with each shard's best k."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from service import artifacts as A
from service import rerank

SHARD = "shard.json"  # in each shard directory: its id range
SHARDS = "shards.json"  # in the sharded memory's directory: the shard directories


@dataclass
class Answer:
    sims: np.ndarray  # (B, k) float32, best first
    ids: np.ndarray  # (B, k) int64 global ids
    values: np.ndarray  # (B, k, dv) float16


class Shard:
    """One shard memory-mapped: search returns its best k with global ids, and their values."""

    def __init__(self, directory: Path, nprobe: int, threads: int = 1):
        info = json.loads((directory / SHARD).read_text())
        self.lo, self.hi = int(info["lo"]), int(info["hi"])
        self.index = faiss.read_index(str(directory / A.INDEX), faiss.IO_FLAG_MMAP_IFC)
        faiss.extract_index_ivf(self.index).nprobe = nprobe
        faiss.omp_set_num_threads(threads)
        self.keys = np.load(directory / A.KEYS, mmap_mode="r")  # (n, d) float16, row i is id lo + i
        self.values = np.load(directory / A.VALUES, mmap_mode="r")  # (n, dv) float16
        self.rerank = rerank.FACTOR if rerank.quantized(self.index) else 0

    def search(self, z: np.ndarray, k: int) -> Answer:
        z = np.ascontiguousarray(z, dtype=np.float32)
        want = min(k * self.rerank, self.hi - self.lo) if self.rerank else k
        sims, ids = self.index.search(z, want)
        if self.rerank:
            local = np.where(ids >= 0, ids - self.lo, -1)
            sims, local = rerank.rerank(z, local, self.keys, min(k, want))
            ids = local + self.lo
        ok = ids >= 0
        rows = np.take(self.values, np.where(ok, ids - self.lo, 0).ravel(), axis=0).reshape(*ids.shape, -1)
        return Answer(sims.astype(np.float32), ids.astype(np.int64), rows)


def merge(answers: list[Answer], k: int) -> Answer:
    """The global top k of the shards' answers: by similarity, ties by id (missing entries, id -1, last)."""
    sims = np.concatenate([a.sims for a in answers], 1)  # (B, S*k)
    ids = np.concatenate([a.ids for a in answers], 1)
    values = np.concatenate([a.values for a in answers], 1)  # (B, S*k, dv)
    sims = np.where(ids >= 0, sims, -np.inf)
    order = np.lexsort((ids, -sims), axis=1)[:, :k]  # (B, k)
    return Answer(
        np.take_along_axis(sims, order, 1),
        np.take_along_axis(ids, order, 1),
        np.take_along_axis(values, order[..., None], 1),
    )
