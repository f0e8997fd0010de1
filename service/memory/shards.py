"""A memory in shards: each shard a memory directory of its own holding the items whose id is its number modulo
the shard count, all sharing the unsharded index's trained coarse quantizer; and the merge of the shards'
answers into the global top k, what a sharded deployment's ingress does with each shard's best k.

A shard owns a set of ids, not a range of rows: an item's id never changes, and neither does its shard.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from service.artifacts import ITEMS, ArtifactError, Manifest
from service.errors import Unavailable
from service.memory.filters import ByItemIds, Filter, Selection
from service.memory.items import ItemTable, check_sqlite
from service.memory.store import Memory

SHARD = "shard.json"  # in each shard directory: which shard it is, of how many, of which memory version
SHARDS = "shards.json"  # in the sharded memory's directory: the shard directories


class At(NamedTuple):
    """The memory version a shard call is for, and the sharded directory that holds it (where a replica that does
    not hold that version loads it from: one started after a switch)."""

    version: str
    directory: str


class ShardInfo(NamedTuple):
    shard: int  # this shard holds the items whose id % shards == shard
    shards: int
    size: int  # items it holds
    memory_version: str  # of the memory it was cut from


def owners(ids: np.ndarray, shards: int) -> np.ndarray:
    """The shard that holds each id."""
    return np.asarray(ids, np.int64) % shards


class ShardsUnavailable(Unavailable):
    """A shard could not be reached (every replica down, or refusing): the request answers 503."""

    def __init__(self, why: str):
        super().__init__(f"a memory shard is unavailable, retry shortly: {why}")


class StaleShard(Exception):
    """A shard replica asked for another memory version than the one it holds (during a rolling update of the
    shard deployments, some replicas hold the old version and some the new): it answers nothing, so that no
    answer mixes two versions. Another replica may hold the version asked for."""


@dataclass
class Answer:
    sims: np.ndarray  # (B, k) float32, best first
    ids: np.ndarray  # (B, k) int64 ids, -1 where the shard found fewer
    values: np.ndarray  # (B, k, dv) float16


@dataclass(frozen=True)
class FilterSpec:
    """A filter as a shard resolves it: its sources and tags, the ids of its excluded keys (the ingress holds
    the keys), and how many of the whole memory's items pass (every shard probes the lists the unsharded
    search would, however the passing items fall among the shards)."""

    filter: Filter
    excluded: tuple[int, ...]
    count: int
    size: int


class Shard:
    """One shard memory-mapped: its best k of a batch of queries with their values, and its rows by id."""

    def __init__(self, directory: Path, nprobe: int, threads: int = 1):
        self.directory = directory
        info = json.loads((directory / SHARD).read_text())
        self.info = ShardInfo(int(info["shard"]), int(info["shards"]), int(info["size"]), str(info["memory_version"]))
        self.memory = Memory(directory, nprobe, threads)
        m = self.memory
        if not (m.size == len(m.keys) == len(m.values) == m.filters.size == self.info.size):
            raise ArtifactError(
                f"{directory}: index holds {m.size} items, keys {len(m.keys)}, values {len(m.values)}, items "
                f"{m.filters.size}, its shard.json {self.info.size}"
            )
        if (owners(m.filters.ids, self.info.shards) != self.info.shard).any():
            raise ArtifactError(f"{directory}: holds ids of another shard than {self.info.shard} of {self.info.shards}")

    def check(self, version: str | None) -> None:
        """StaleShard unless this shard was cut from `version` (None: any)."""
        if version is not None and version != self.info.memory_version:
            raise StaleShard(f"shard {self.info.shard} holds memory version {self.info.memory_version}, not {version}")

    def search(
        self,
        z: np.ndarray,
        k: int,
        every_list: bool = False,
        spec: FilterSpec | None = None,
        version: str | None = None,
    ) -> Answer:
        """z (B, d) float32 -> this shard's best k (padded with id -1 where it found fewer) among the items
        `spec` lets through; every_list: probe every list (what the unsharded memory does for a query its
        probes found too few items for); version: the memory version the caller serves (StaleShard if not)."""
        self.check(version)
        selection = None
        if spec is not None:
            mine = self.memory.filters.select(spec.filter, spec.excluded)
            selection = replace(mine, count=spec.count, size=spec.size)
        sims, ids = self.memory.candidates(z, k, selection, every_list)
        found = ids >= 0
        values = np.zeros((*ids.shape, self.memory.value_dim), np.float16)  # (B, k, dv)
        values[found] = self.memory.gather(ids[found], False, True)[1]
        return Answer(sims.astype(np.float32), ids.astype(np.int64), values)

    def gather(
        self, ids: np.ndarray, keys: bool, values: bool, version: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """ids (n,) this shard holds -> keys (n, d) and values (n, dv), float16; (n, 0) if not wanted."""
        self.check(version)
        return self.memory.gather(np.asarray(ids, np.int64), keys, values)


def merge(answers: list[Answer], k: int) -> Answer:
    """The global top k of the shards' answers: by similarity, ties by id (missing entries, id -1, last)."""
    sims = np.concatenate([a.sims for a in answers], 1)  # (B, S*k)
    ids = np.concatenate([a.ids for a in answers], 1)
    values = np.concatenate([a.values for a in answers], 1)  # (B, S*k, dv)
    sims = np.where(ids >= 0, sims, -np.inf)
    order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -sims), axis=1)[:, :k]  # (B, k)
    return Answer(
        np.take_along_axis(sims, order, 1),
        np.take_along_axis(ids, order, 1),
        np.take_along_axis(values, order[..., None], 1),
    )


class ShardClient(Protocol):
    """How a sharded memory reaches its shards: in this process (LocalShards) or over Ray (service/cluster/app.py).
    Every call goes to every shard at once, answers in shard order. `load` readies a version on every shard (over
    Ray: on every replica) and describes its shards; `release` lets it go. Searches and gathers name the
    version they are for: a shard that holds another answers nothing (StaleShard; ShardsUnavailable where no
    replica holds it), so no answer mixes two versions."""

    def load(self, directory: Path) -> list[ShardInfo]: ...

    def release(self, version: str) -> None: ...

    def search(self, z: np.ndarray, k: int, every_list: bool, spec: FilterSpec | None, at: At) -> list[Answer]: ...

    def gather(
        self, ids: Sequence[np.ndarray], keys: bool, values: bool, at: At
    ) -> list[tuple[np.ndarray, np.ndarray]]: ...


class LocalShards:
    """The shards opened in this process (tests, and a reference for the remote client)."""

    def __init__(self, shards: list[Shard]):
        self.shards = shards

    def load(self, directory: Path) -> list[ShardInfo]:
        """The shards this was given (a test gives the ones it means, right or wrong), described."""
        return [s.info for s in self.shards]

    def release(self, version: str) -> None:
        """Nothing: the test that made the shards closes them."""

    def search(self, z: np.ndarray, k: int, every_list: bool, spec: FilterSpec | None, at: At) -> list[Answer]:
        with stale_is_unavailable():
            return [s.search(z, k, every_list, spec, at.version) for s in self.shards]

    def gather(
        self, ids: Sequence[np.ndarray], keys: bool, values: bool, at: At
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        with stale_is_unavailable():
            return [s.gather(i, keys, values, at.version) for s, i in zip(self.shards, ids, strict=True)]


@contextlib.contextmanager
def stale_is_unavailable() -> Iterator[None]:
    """A shard of another version, and none other to ask: the request answers 503 naming it."""
    try:
        yield
    except StaleShard as e:
        raise ShardsUnavailable(str(e)) from e


class ShardedMemory(ByItemIds):
    """A memory whose index, keys and values live in shards: the served Memory's interface (search, lookup,
    gather, select, the item table), each call fanned out to every shard and merged. The item table stays here
    (the ingress describes the neighbours it answers with, and resolves filters' keys)."""

    def __init__(self, directory: Path, manifest: Manifest, client: ShardClient):
        self.directory, self.client = directory, client
        self.at = At(manifest.memory_version, str(directory))
        self.table = ItemTable(directory / ITEMS)
        self.filters = self.table.filter_index()
        self.shards = client.load(directory)  # every shard (every replica) holds this version from here
        self.dim, self.value_dim = manifest.encoder.dim, manifest.memory.value_dim
        self.size, self.n_items = manifest.memory.size, self.table.size
        self.rerank = 0  # done inside each shard

    def close(self) -> None:
        self.table.close()
        self.client.release(self.at.version)

    def select(self, f: Filter) -> Selection:
        self.filters.check(f)
        excluded = tuple(sorted(item.id for item in self.table.by_keys(list(f.exclude_keys)).values()))
        return self.filters.select(f, excluded)

    def lookup(
        self, z: np.ndarray, k: int, values: bool, selection: Selection | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """z (B, d) -> sims (B, n), ids (B, n), values (B, n, dv): one round trip to each shard."""
        spec = None
        if selection is not None:
            spec = FilterSpec(selection.filter, selection.excluded, selection.count, selection.size)
        n = min(k, selection.count if selection is not None else self.size)
        merged = merge(self.client.search(z, k, False, spec, self.at), k)
        short = (merged.ids >= 0).sum(1) < n  # as Memory.search: probe every list where the probes found too few
        if short.any():
            again = merge(self.client.search(z[short], k, True, spec, self.at), k)
            merged.sims[short], merged.ids[short], merged.values[short] = again.sims, again.ids, again.values
        if ((merged.ids >= 0).sum(1) < n).any():
            raise RuntimeError(f"the memory holds fewer than {n} items that pass")
        vals = merged.values[:, :n] if values else np.empty((len(z), n, 0), np.float16)
        return merged.sims[:, :n], merged.ids[:, :n], vals

    def search(self, z: np.ndarray, k: int, selection: Selection | None = None) -> tuple[np.ndarray, np.ndarray]:
        sims, ids, _ = self.lookup(z, k, False, selection)
        return sims, ids

    def gather(self, ids: np.ndarray, keys: bool, values: bool) -> tuple[np.ndarray, np.ndarray]:
        """ids (B, n) -> keys (B, n, d), values (B, n, dv) float16, each id asked of the shard holding it."""
        flat = ids.ravel()
        if not self.contains(flat):
            raise ValueError("ids that are not in the memory")
        owner = owners(flat, len(self.shards))
        parts = self.client.gather([flat[owner == s] for s in range(len(self.shards))], keys, values, self.at)
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
        raise ArtifactError(f"{path} not found: write shards with `rac memory shard --out {directory}`")
    return [directory / d for d in json.loads(path.read_text())["shards"]]


def check_sharded(directory: Path, manifest: Manifest, memory: ShardedMemory) -> None:
    """The shards are shards 0..S-1 of S, cut from this memory version, together holding its items."""
    check_sqlite(directory / ITEMS)
    infos, size = memory.shards, manifest.memory.size
    count = len(infos)
    if [(s.shard, s.shards) for s in infos] != [(i, count) for i in range(count)]:
        places = [(s.shard, s.shards) for s in infos]
        raise ArtifactError(
            f"{directory}: shards {places} do not cover the memory: not shards 0..{count - 1} of {count}"
        )
    if sum(s.size for s in infos) != size or memory.filters.size != size:
        raise ArtifactError(
            f"{directory}: shards hold {sum(s.size for s in infos)} items, the item table {memory.filters.size}, "
            f"the manifest {size}: they do not cover the memory"
        )
    for s in infos:
        if s.memory_version != manifest.memory_version:
            raise ArtifactError(
                f"{directory}: shard {s.shard} was cut from memory version {s.memory_version}, "
                f"not {manifest.memory_version}"
            )
