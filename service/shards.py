"""A memory shard (a contiguous id range of a memory, sharing its trained index) and the merge of the shards'
answers into the global top k: what a sharded deployment's ingress does with each shard's best k."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import faiss
import numpy as np

from service import artifacts as A
from service import rerank
from service.memory import Described, ItemTable, check_sqlite, open_array

SHARD = "shard.json"  # in each shard directory: its id range
SHARDS = "shards.json"  # in the sharded memory's directory: the shard directories


class ShardInfo(NamedTuple):
    lo: int  # the shard holds ids [lo, hi)
    hi: int
    memory_version: str  # of the memory it was cut from


class ShardsUnavailable(RuntimeError):
    """A shard could not be reached (every replica down, or refusing): the request answers 503."""


@dataclass
class Answer:
    sims: np.ndarray  # (B, k) float32, best first
    ids: np.ndarray  # (B, k) int64 global ids
    values: np.ndarray  # (B, k, dv) float16


class Shard:
    """One shard memory-mapped: search returns its best k with global ids, and their values."""

    def __init__(self, directory: Path, nprobe: int, threads: int = 1):
        info = json.loads((directory / SHARD).read_text())
        self.info = ShardInfo(int(info["lo"]), int(info["hi"]), str(info["memory_version"]))
        self.lo, self.hi = self.info.lo, self.info.hi
        self.index = faiss.read_index(str(directory / A.INDEX), faiss.IO_FLAG_MMAP_IFC)
        faiss.extract_index_ivf(self.index).nprobe = nprobe
        faiss.omp_set_num_threads(threads)
        self.keys = open_array(directory / A.KEYS)  # (n, d) float16, row i is id lo + i
        self.values = open_array(directory / A.VALUES)  # (n, dv) float16
        self.rerank = rerank.FACTOR if rerank.quantized(self.index) else 0
        n = self.hi - self.lo
        if not (self.index.ntotal == len(self.keys) == len(self.values) == n):
            raise A.ArtifactError(
                f"{directory}: index holds {self.index.ntotal} items, keys {len(self.keys)}, values "
                f"{len(self.values)}, its id range [{self.lo}, {self.hi}) {n}"
            )

    def search(self, z: np.ndarray, k: int, exhaustive: bool = False) -> Answer:
        """z (B, d) float32 -> this shard's best k (padded with id -1 where its probes found fewer); exhaustive:
        probe every list (what the unsharded memory does for a query its probes found too few items for)."""
        z = np.ascontiguousarray(z, dtype=np.float32)
        want = min(k * self.rerank, self.hi - self.lo) if self.rerank else k
        params = rerank.exhaustive(self.index) if exhaustive else None
        sims, ids = self.index.search(z, want, params=params)
        if self.rerank:
            local = np.where(ids >= 0, ids - self.lo, -1)
            sims, local = rerank.rerank(z, local, self.keys, min(k, want))
            ids = np.where(local >= 0, local + self.lo, -1)
        ok = ids >= 0
        rows = np.take(self.values, np.where(ok, ids - self.lo, 0).ravel(), axis=0).reshape(*ids.shape, -1)
        return Answer(sims.astype(np.float32), ids.astype(np.int64), rows)

    def gather(self, ids: np.ndarray, keys: bool, values: bool) -> tuple[np.ndarray, np.ndarray]:
        """Global ids (n,) in this shard's range -> keys (n, d) and values (n, dv), float16; (n, 0) if not wanted."""
        local = np.asarray(ids, np.int64) - self.lo
        if ((local < 0) | (local >= self.hi - self.lo)).any():
            raise ValueError(f"ids outside shard [{self.lo}, {self.hi})")

        def take(store: np.ndarray, wanted: bool) -> np.ndarray:
            return np.take(store, local, axis=0) if wanted else np.empty((len(local), 0), np.float16)

        return take(self.keys, keys), take(self.values, values)


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


class ShardClient(Protocol):
    """How a sharded memory reaches its shards: in this process (LocalShards) or over Ray (service/ray_app.py).
    Both calls go to every shard at once, answers in shard order."""

    def describe(self) -> list[ShardInfo]: ...

    def search(self, z: np.ndarray, k: int, exhaustive: bool) -> list[Answer]: ...

    def gather(self, ids: Sequence[np.ndarray], keys: bool, values: bool) -> list[tuple[np.ndarray, np.ndarray]]: ...


class LocalShards:
    """The shards opened in this process (tests, and a reference for the remote client)."""

    def __init__(self, shards: list[Shard]):
        self.shards = shards

    def describe(self) -> list[ShardInfo]:
        return [s.info for s in self.shards]

    def search(self, z: np.ndarray, k: int, exhaustive: bool) -> list[Answer]:
        return [s.search(z, k, exhaustive) for s in self.shards]

    def gather(self, ids: Sequence[np.ndarray], keys: bool, values: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        return [s.gather(i, keys, values) for s, i in zip(self.shards, ids, strict=True)]


class ShardedMemory(Described):
    """A memory whose index, keys and values live in shards: the served Memory's interface (search, lookup,
    gather, items), each call fanned out to every shard and merged. The item table stays here (the ingress
    describes the neighbours it answers with)."""

    def __init__(self, directory: Path, manifest: A.Manifest, client: ShardClient):
        self.directory, self.client = directory, client
        self.table = ItemTable(directory / A.ITEMS)
        self.shards = client.describe()
        self.bounds = [(s.lo, s.hi) for s in self.shards]
        self.dim, self.value_dim = manifest.encoder.dim, manifest.memory.value_dim
        self.size, self.n_items = manifest.memory.size, self.table.size
        self.rerank = 0  # done inside each shard

    def lookup(self, z: np.ndarray, k: int, values: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """z (B, d) -> sims (B, k), ids (B, k), values (B, k, dv): one round trip to each shard."""
        merged = merge(self.client.search(z, k, False), k)
        short = (merged.ids < 0).any(1)  # as Memory.search: probe every list for a query whose probes found too few
        if short.any():
            again = merge(self.client.search(z[short], k, True), k)
            merged.sims[short], merged.ids[short], merged.values[short] = again.sims, again.ids, again.values
        if (merged.ids < 0).any():
            raise RuntimeError(f"the memory holds fewer than k={k} items")
        vals = merged.values if values else np.empty((*merged.ids.shape, 0), np.float16)
        return merged.sims, merged.ids, vals

    def search(self, z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims, ids, _ = self.lookup(z, k, False)
        return sims, ids

    def gather(self, ids: np.ndarray, keys: bool, values: bool) -> tuple[np.ndarray, np.ndarray]:
        """ids (B, k) -> keys (B, k, d), values (B, k, dv) float16, each id asked of the shard holding it."""
        flat = ids.ravel()
        owner = np.searchsorted([hi for _, hi in self.bounds], flat, side="right")  # (B*k,) shard of each id
        if ((flat < 0) | (owner >= len(self.bounds))).any():
            raise ValueError(f"ids outside the memory [0, {self.size})")
        parts = self.client.gather([flat[owner == s] for s in range(len(self.bounds))], keys, values)
        out_k = np.empty((len(flat), self.dim if keys else 0), np.float16)
        out_v = np.empty((len(flat), self.value_dim if values else 0), np.float16)
        for s, (pk, pv) in enumerate(parts):
            out_k[owner == s], out_v[owner == s] = pk, pv
        return out_k.reshape(*ids.shape, -1), out_v.reshape(*ids.shape, -1)

    def prefault(self) -> None:
        """Nothing here: each shard pre-faults its own files."""

    def willneed(self) -> None:
        """Nothing here: each shard reads its own files ahead."""


def shard_dirs(directory: Path) -> list[Path]:
    """The shard directories of a sharded memory (DIR/shards.json)."""
    path = directory / SHARDS
    if not path.exists():
        raise A.ArtifactError(f"{path} not found: write shards with `rac memory shard --out {directory}`")
    return [directory / d for d in json.loads(path.read_text())["shards"]]


def check_sharded(directory: Path, manifest: A.Manifest, memory: ShardedMemory) -> None:
    """The shards' id ranges cover the memory once, in order, they were cut from this memory version, and the
    item table holds every id."""
    check_sqlite(directory / A.ITEMS)
    bounds, size = memory.bounds, manifest.memory.size
    covered = bounds and bounds[0][0] == 0 and bounds[-1][1] == size
    if not covered or any(a[1] != b[0] for a, b in itertools.pairwise(bounds)):
        raise A.ArtifactError(f"{directory}: shard ranges {bounds} do not cover the memory's {size} ids once")
    if others := {s.memory_version for s in memory.shards} - {manifest.memory_version}:
        raise A.ArtifactError(f"{directory}: shards of memory {others}, the manifest's is {manifest.memory_version}")
    if memory.n_items != size:
        raise A.ArtifactError(f"{directory}: item table holds {memory.n_items} rows, the memory {size}")
