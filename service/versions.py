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

from service import artifacts as A
from service.batching import cancel
from service.memory import Memory
from service.metrics import Metrics
from service.settings import Settings
from service.shards import ShardClient, ShardedMemory, check_sharded
from service.zeroshot_memory import ZsMemory, load_zs_memory

log = logging.getLogger(__name__)


@dataclass(eq=False)
class MemoryVersion:
    directory: Path
    manifest: A.Manifest
    memory: Memory | ShardedMemory
    zero_shot: ZsMemory | None = None  # its text index and aligned texts, where it has zero-shot parts
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


def load_version(directory: Path, settings: Settings, model: A.Manifest | None, encoder_dim: int) -> MemoryVersion:
    """Read, verify and check one version directory; raises ArtifactError naming what does not fit.

    model: the manifest of the model being served (None at start-up, where the model comes from this
    directory itself)."""
    manifest = A.read_manifest(directory)
    if model is not None and (why := A.model_mismatch(model, manifest)):
        raise A.ArtifactError(f"{directory}: {why}")
    if settings.verify_checksums:
        # Whole files, or sizes and sampled chunks where the build wrote chunk digests (service/integrity.py).
        A.verify_files(directory, manifest, full=settings.verify_full)
    memory = Memory(directory, manifest.index.nprobe, settings.search_threads)
    try:
        check_memory(directory, manifest, memory, encoder_dim)
        zs = manifest.zero_shot
        zero_shot = (
            None if zs is None else load_zs_memory(directory, zs, memory.size, memory.dim, settings.verify_checksums)
        )
    except A.ArtifactError:
        memory.close()
        raise
    if settings.prefault:
        memory.prefault()  # before it serves (at start-up: before /readyz): no cold page inside a request
    else:
        memory.willneed()
    return MemoryVersion(directory, manifest, memory, zero_shot)


# How a pipeline opens a memory version: (directory, settings, the served model's manifest or None, encoder
# dimension) -> MemoryVersion; raises ArtifactError. load_version, or a sharded memory's opener.
OpenMemory: TypeAlias = Callable[[Path, Settings, A.Manifest | None, int], MemoryVersion]


def sharded(client: ShardClient) -> OpenMemory:
    """An opener for a sharded memory's directory (`rac memory shard --out`): its manifest, encoder, head and
    item table here, its index, keys and values in the shards `client` reaches (each checks its files' sizes
    against its id range; this checks the ranges and versions against the manifest)."""

    def open_sharded(directory: Path, settings: Settings, model: A.Manifest | None, encoder_dim: int) -> MemoryVersion:
        manifest = A.read_manifest(directory)
        if model is not None and (why := A.model_mismatch(model, manifest)):
            raise A.ArtifactError(f"{directory}: {why}")
        if settings.verify_checksums:
            A.verify_files(directory, manifest, full=settings.verify_full, names=(A.ENCODER, A.HEAD, A.ITEMS))
        memory = ShardedMemory(directory, manifest, client)
        try:
            if encoder_dim != manifest.encoder.dim:
                raise A.ArtifactError(f"encoder outputs {encoder_dim}-d, manifest says {manifest.encoder.dim}")
            check_sharded(directory, manifest, memory)
        except A.ArtifactError:
            memory.close()
            raise
        return MemoryVersion(directory, manifest, memory)

    return open_sharded


def check_memory(directory: Path, m: A.Manifest, mem: Memory, encoder_dim: int) -> None:
    """Sizes and shapes of index, keys, values and items against each other and the manifest: these hold
    whether or not checksums are verified."""

    def require(ok: bool, what: str) -> None:
        if not ok:
            raise A.ArtifactError(f"artifacts in {directory} do not fit together: {what}")

    require(encoder_dim == m.encoder.dim, f"encoder outputs {encoder_dim}-d, manifest says {m.encoder.dim}")
    require(mem.dim == encoder_dim, f"index is {mem.dim}-d, encoder outputs {encoder_dim}-d")
    require(mem.size == m.memory.size, f"index holds {mem.size} items, manifest says {m.memory.size}")
    require(mem.n_items == mem.size, f"item table holds {mem.n_items} rows, index {mem.size}")
    require(mem.keys.shape == (mem.size, mem.dim), f"keys are {mem.keys.shape}, expected ({mem.size}, {mem.dim})")
    dv = m.memory.value_dim
    require(mem.values.shape == (mem.size, dv), f"values are {mem.values.shape}, expected ({mem.size}, {dv})")
    require(0 < m.index.k <= mem.size, f"k={m.index.k} with {mem.size} memory items")


class Follower:
    """Follows ROOT/current: polls its target every `poll_s`, looks at once when woken (SIGHUP, admin
    reload), and hands a changed target to `swap`."""

    def __init__(
        self,
        root: Path,
        served: Callable[[], Path],
        swap: Callable[[Path], Awaitable[None]],
        poll_s: float,
        metrics: Metrics,
    ):
        self.root, self.served, self.swap, self.poll_s, self.metrics = root, served, swap, poll_s, metrics
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
            target = A.resolve(self.root)
            if target == self.served() or (target == self.failed and not retry):
                return False
            t = time.perf_counter()
            try:
                await self.swap(target)
            except A.ArtifactError as e:
                self.failed, self.last_error = target, str(e)
                self.failures += 1
                self.metrics.memory_load_failures.inc()
                log.error("refusing memory version in %s, still serving %s: %s", target, self.served(), e)
                return False
            self.failed, self.last_error = None, None
            self.swaps += 1
            self.last_swap_s = time.perf_counter() - t
            self.metrics.memory_swaps.inc()
            self.metrics.memory_swap_seconds.observe(self.last_swap_s)
            log.info("now serving memory %s (swap took %.3f s)", target, self.last_swap_s)
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
