"""Memory versions online: one object per loaded version (index, keys, values, items, manifest), and the
follower that swaps the served one when a serving root's `current` link moves.

A request takes a reference to the version being served when it starts and gives it back when it is
answered; a swap replaces the pipeline's reference between two batches and never touches the object in use.
The old version is closed once no request holds it. A version that fails to load or check is logged and
counted, and the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import numpy as np

from service.artifacts import (
    ENCODER,
    HEAD,
    ITEMS,
    ArtifactError,
    Manifest,
    model_mismatch,
    read_manifest,
    resolve,
    verify_files,
)
from service.core.batching import cancel
from service.memory.shards import ShardClient, ShardedMemory, check_sharded
from service.memory.store import Memory
from service.memory.text_index import TextIndex, load_text_index
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(eq=False)
class MemoryVersion:
    directory: Path
    manifest: Manifest
    memory: Memory | ShardedMemory
    text_index: TextIndex | None = None  # its zero-shot text index and aligned texts, where it has them
    name: str = "default"  # the named memory it is a version of (set by the server that serves it)
    refs: int = 0  # requests holding it (changed on the event loop only)
    retired: bool = False  # no longer served: closed when the last request lets go

    @property
    def id(self) -> str:
        return self.manifest.memory_version

    def acquire(self) -> MemoryVersion:
        self.refs += 1
        return self

    def release(self) -> None:
        self.refs -= 1
        if self.retired and self.refs == 0:
            self.memory.close()

    def retire(self) -> None:
        self.retired = True
        if self.refs == 0:
            self.memory.close()


def load_version(directory: Path, settings: Settings, model: Manifest | None, encoder_dim: int) -> MemoryVersion:
    """Read, verify and check one version directory; raises ArtifactError naming what does not fit.

    model: the manifest of the model being served (None at start-up, where the model comes from this
    directory itself)."""
    manifest = read_manifest(directory)
    if model is not None and (why := model_mismatch(model, manifest)):
        raise ArtifactError(f"{directory}: {why}")
    if settings.verify_checksums:
        # Whole files, or sizes and sampled chunks where the build wrote chunk digests (service/memory/integrity.py).
        verify_files(directory, manifest, full=settings.verify_full)
    memory = Memory(directory, manifest.index.nprobe, settings.search_threads)
    try:
        check_memory(directory, manifest, memory, encoder_dim)
        zero_shot = zero_shot_index(directory, manifest, memory.size, memory.dim, settings.verify_checksums)
    except ArtifactError:
        memory.close()
        raise
    if settings.prefault:
        memory.prefault()  # before it serves (at start-up: before /readyz): no cold page inside a request
    else:
        memory.willneed()
    return MemoryVersion(directory, manifest, memory, zero_shot)


def zero_shot_index(directory: Path, manifest: Manifest, size: int, dim: int, verify: bool) -> TextIndex | None:
    """The version's zero-shot text index and aligned texts, where its manifest says it has them."""
    zs = manifest.zero_shot
    return None if zs is None else load_text_index(directory, zs, size, dim, verify)


# How a pipeline opens a memory version: (directory, settings, the served model's manifest or None, encoder
# dimension) -> MemoryVersion; raises ArtifactError. load_version, or a sharded memory's opener.
OpenMemory: TypeAlias = Callable[[Path, Settings, Manifest | None, int], MemoryVersion]


def sharded(client: ShardClient) -> OpenMemory:
    """An opener for a sharded memory's directory (`rac memory shard --out`): its manifest, encoder, head and
    item table here, its index, keys and values in the shards `client` reaches (each checks its files' sizes
    against its id range; this checks the ranges and versions against the manifest)."""

    def open_sharded(directory: Path, settings: Settings, model: Manifest | None, encoder_dim: int) -> MemoryVersion:
        manifest = read_manifest(directory)
        if model is not None and (why := model_mismatch(model, manifest)):
            raise ArtifactError(f"{directory}: {why}")
        if settings.verify_checksums:
            verify_files(directory, manifest, full=settings.verify_full, names=(ENCODER, HEAD, ITEMS))
        memory = ShardedMemory(directory, manifest, client)
        try:
            if encoder_dim != manifest.encoder.dim:
                raise ArtifactError(f"encoder outputs {encoder_dim}-d, manifest says {manifest.encoder.dim}")
            check_sharded(directory, manifest, memory)
            zero_shot = zero_shot_index(directory, manifest, memory.size, memory.dim, settings.verify_checksums)
        except ArtifactError:
            memory.close()
            raise
        return MemoryVersion(directory, manifest, memory, zero_shot)

    return open_sharded


def check_memory(directory: Path, m: Manifest, mem: Memory, encoder_dim: int) -> None:
    """Sizes and shapes of index, keys, values and items against each other and the manifest: these hold
    whether or not checksums are verified."""

    def require(ok: bool, what: str) -> None:
        if not ok:
            raise ArtifactError(f"artifacts in {directory} do not fit together: {what}")

    require(encoder_dim == m.encoder.dim, f"encoder outputs {encoder_dim}-d, manifest says {m.encoder.dim}")
    require(mem.dim == encoder_dim, f"index is {mem.dim}-d, encoder outputs {encoder_dim}-d")
    require(mem.size == m.memory.size, f"index holds {mem.size} items, manifest says {m.memory.size}")
    require(mem.n_items == mem.size, f"item table holds {mem.n_items} rows, index {mem.size}")
    want_ids = mem.ids if mem.ids is not None else np.arange(mem.size)
    require(len(want_ids) == mem.size, f"ids.npy holds {len(want_ids)} ids, index {mem.size} items")
    require(np.array_equal(mem.filters.ids, want_ids), "the item table's ids are not those of the keys' rows")
    require(mem.size == 0 or want_ids[-1] < (m.memory.next_id or mem.size), "an id at or above the next id to give")
    require(mem.keys.shape == (mem.size, mem.dim), f"keys are {mem.keys.shape}, expected ({mem.size}, {mem.dim})")
    dv = m.memory.value_dim
    require(mem.values.shape == (mem.size, dv), f"values are {mem.values.shape}, expected ({mem.size}, {dv})")
    require(0 < m.index.k <= mem.size, f"k={m.index.k} with {mem.size} memory items")


@dataclass(eq=False)
class ServedMemory:
    """One named memory a server serves: what the settings named (a serving root, or a flat directory served
    as it is), the version served now, and the follower of the root's `current` link."""

    name: str
    path: Path
    version: MemoryVersion
    follower: Follower | None = None

    def holding(self) -> Held:
        """The version served now, held for a `with` block: a swap never closes it under its user."""
        return Held(self.version)


class Held:
    """A version held for a `with` block (a class: a generator's context manager costs a request about 1.6 µs
    more on these cores)."""

    __slots__ = ("version",)

    def __init__(self, version: MemoryVersion):
        self.version = version.acquire()

    def __enter__(self) -> MemoryVersion:
        return self.version

    def __exit__(self, *exc: object) -> None:
        self.version.release()


class Follower:
    """Follows ROOT/current: polls its target every `poll_s`, looks at once when woken (SIGHUP, admin
    reload), and hands a changed target to `swap`."""

    def __init__(
        self,
        name: str,
        root: Path,
        served: Callable[[], Path],
        swap: Callable[[Path], Awaitable[None]],
        poll_s: float,
        metrics: Metrics,
    ):
        self.name, self.root, self.served, self.swap = name, root, served, swap
        self.poll_s, self.metrics = poll_s, metrics
        self.wake = asyncio.Event()
        self.lock = asyncio.Lock()
        self.failed: Path | None = None  # a target that failed: not retried until it changes or on demand
        self.swaps, self.failures, self.last_swap_s = 0, 0, 0.0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        await cancel(self._task)

    async def _loop(self) -> None:
        while True:
            woken = False
            try:
                await asyncio.wait_for(self.wake.wait(), self.poll_s)
                woken = True
            except TimeoutError:
                pass
            self.wake.clear()
            try:
                await self.check(retry=woken)
            except Exception:  # the follower never dies: the next poll tries again
                log.exception("memory follower")

    async def check(self, retry: bool = True) -> bool:
        """Swap to ROOT/current's target if it is not what is served; True when a swap happened."""
        async with self.lock:
            target = resolve(self.root)
            if target == self.served() or (target == self.failed and not retry):
                return False
            t = time.perf_counter()
            try:
                await self.swap(target)
            except ArtifactError as e:
                self.failed, self.last_error = target, str(e)
                self.failures += 1
                self.metrics.memory_load_failures.labels(self.name).inc()
                log.error(
                    "memory %s: refusing the version in %s, still serving %s: %s", self.name, target, self.served(), e
                )
                return False
            self.failed, self.last_error = None, None
            self.swaps += 1
            self.last_swap_s = time.perf_counter() - t
            self.metrics.memory_swaps.labels(self.name).inc()
            self.metrics.memory_swap_seconds.observe(self.last_swap_s)
            log.info("memory %s: now serving %s (swap took %.3f s)", self.name, target, self.last_swap_s)
            return True

    def status(self) -> dict[str, object]:
        return {
            "root": str(self.root),
            "poll_s": self.poll_s,
            "swaps": self.swaps,
            "last_swap_s": round(self.last_swap_s, 4),
            "failed_loads": self.failures,
            "last_error": self.last_error,
        }
