"""A memory shard on Ray: the process that holds it, the Serve replica that owns that process, and the ingress's
client that calls the processes directly.

Each replica of a shard deployment (`shard-0`, `shard-1`, ...) starts one plain Ray actor, its shard process
(ShardServer), and owns it: the process ends with its replica, and a replica whose process died reports itself
unhealthy, so Serve starts another in its place. Serve keeps what it is for: how many replicas, on which nodes,
their restarts and rolling updates. The ingress asks each deployment for its replicas' processes (a broadcast,
again every few seconds and whenever one fails) and sends each search to one of them itself, round robin: a
shard call pays Ray's actor call, not Serve's router as well (`python -m loadtests.ray_calls` times both:
results/ray_calls.json).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import ray
from ray.actor import ActorHandle
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from service.artifacts import ArtifactError, read_manifest, resolve
from service.memory.shards import Answer, At, FilterSpec, Shard, ShardInfo, ShardsUnavailable, StaleShard, shard_dirs

log = logging.getLogger(__name__)

# A shard call a dying (or stale) process dropped is sent to another replica's process, at most this many times,
# the first at once, the others this far apart.
RETRIES = 20
RETRY_PAUSE_S = 0.05
REFRESH_S = 5.0  # how often the ingress asks the deployments for their replicas' processes
LOAD_TIMEOUT_S = 600.0  # how long every replica of a shard may take to load (and pre-fault) a new version
RELOAD_PAUSE_S = 0.5  # between asking again for a shard's processes while none has loaded a version
HEALTH_TIMEOUT_S = 10.0  # a shard process that does not answer a ping within this is not healthy
DIED = (ray.exceptions.RayActorError, ReplicaUnavailableError)  # the process (or its replica) is gone


class ShardServer:
    """Shard number `shard` of each memory version the ingress serves, memory-mapped: its best k of a batch of
    queries, and its rows by id. It holds the version the root names when it starts; the ingress has every
    process load a new version before it switches, and lets the old one go after. A process started later (in
    place of one that died) loads a version on the first call for it."""

    def __init__(self, root: str, shard: int, threads: int):
        self.shard, self.threads = shard, threads
        self.versions: dict[str, Shard] = {}
        self.lock = threading.Lock()
        self.load(str(resolve(Path(root))))

    def ping(self) -> int:
        return self.shard

    def load(self, directory: str) -> ShardInfo:
        """Open this shard of the sharded memory in `directory` (pre-faulted: its first search reads no cold
        page) beside the versions held; ArtifactError where it does not fit."""
        with self.lock:
            for held in self.versions.values():
                if held.directory == Path(directory):
                    return held.info
            nprobe = read_manifest(Path(directory)).index.nprobe
            shard = Shard(shard_dirs(Path(directory))[self.shard], nprobe, self.threads)
            shard.memory.prefault()
            self.versions[shard.info.memory_version] = shard
            log.info("shard %d: holding memory version %s", self.shard, shard.info.memory_version)
            return shard.info

    def drop(self, version: str) -> None:
        with self.lock:
            gone = self.versions.pop(version, None)
        if gone is not None:
            gone.memory.close()

    def _of(self, at: At) -> Shard:
        held = self.versions.get(at.version)
        if held is None:
            self.load(at.directory)
            held = self.versions.get(at.version)
        if held is None:
            raise StaleShard(f"{at.directory} does not hold memory version {at.version}")
        return held

    def search(self, z: np.ndarray, k: int, every_list: bool, spec: FilterSpec | None, at: At) -> Answer:
        return self._of(at).search(z, k, every_list, spec, at.version)

    def gather(self, ids: np.ndarray, keys: bool, values: bool, at: At) -> tuple[np.ndarray, np.ndarray]:
        return self._of(at).gather(ids, keys, values, at.version)


ShardProcess = ray.remote(max_restarts=0)(ShardServer)


class ShardReplica:
    """A replica of a shard deployment: starts the shard's process (as many CPUs as the config gives a shard
    replica) and answers with its handle; healthy while the process answers."""

    def __init__(self, root: str, shard: int, threads: int, cpus: float):
        # One OpenMP thread unless asked (replicas share the node's cores); RAC_SHARD says which shard it holds.
        env = {"env_vars": {"OMP_NUM_THREADS": str(threads), "RAC_SHARD": str(shard)}}
        options = {"num_cpus": cpus, "runtime_env": env}
        self.server = cast(Any, ShardProcess.options(**options).remote(root, shard, threads))
        ray.get(self.server.ping.remote())  # opened and pre-faulted before Serve counts the replica as started

    def process(self) -> ActorHandle:
        return self.server

    async def check_health(self) -> None:
        await asyncio.wait_for(self.server.ping.remote(), HEALTH_TIMEOUT_S)


def name_of(process: ActorHandle) -> str:
    return process._actor_id.hex()


class RayShards:
    """The ShardClient over the shard deployments' processes: every call goes to all shards at once, each to one
    of its replicas' processes in turn, and a call a dying process dropped is sent to another. Called from the
    pipeline's batch threads (blocking is fine there)."""

    def __init__(self, handles: Sequence[DeploymentHandle]):
        self.handles = list(handles)
        self.processes: list[list[ActorHandle]] = [[] for _ in self.handles]
        self.dead: set[str] = set()  # processes seen dead: a replica asked before its health check still names it
        self.refreshed = -REFRESH_S
        self.turns = [itertools.count() for _ in self.handles]  # each shard's own count: all its processes in turn
        self.lock = threading.Lock()
        self.retried = 0  # calls sent again after a process failed them
        self.why = ["no replica running" for _ in self.handles]  # what the last refresh could not learn, by shard

    def refresh(self) -> None:
        """Ask every deployment for its replicas' processes. Where a replica does not answer, or the deployment
        has none running (yet), what was known of its shard stays, and `why` says so."""
        answers = [h.broadcast("process") for h in self.handles]
        for s, (handle, answer) in enumerate(zip(self.handles, answers, strict=True)):
            try:
                got = answer.results(timeout_s=HEALTH_TIMEOUT_S)
            except (*DIED, TimeoutError, DeploymentUnavailableError, BackPressureError) as e:
                self.why[s] = f"{type(e).__name__}: {e}"
                log.warning("%s: no replica's process named: %s", handle.deployment_name, self.why[s])
                continue
            with self.lock:
                self.processes[s] = [p for p in got if name_of(p) not in self.dead]
        self.refreshed = time.monotonic()

    def _forget(self, shard: int, process: ActorHandle) -> None:
        with self.lock:
            self.dead.add(name_of(process))
            self.processes[shard] = [p for p in self.processes[shard] if name_of(p) not in self.dead]

    def _pick(self, shard: int) -> ActorHandle:
        """One of the shard's live processes, in turn; asks the deployments again while none is known."""
        for attempt in range(RETRIES + 1):
            with self.lock:
                known = self.processes[shard]
                if known:
                    return known[next(self.turns[shard]) % len(known)]
            if attempt:
                time.sleep(RETRY_PAUSE_S)
            self.refresh()
        raise ShardsUnavailable(f"{self.handles[shard].deployment_name}: no live replica ({self.why[shard]})")

    def _all(self, call: Callable[[ActorHandle, int], Any]) -> list[Any]:
        if time.monotonic() - self.refreshed > REFRESH_S:
            self.refresh()
        chosen = [self._pick(s) for s in range(len(self.handles))]
        pending = [call(p, s) for s, p in enumerate(chosen)]
        return [self._result(s, p, call, ref) for s, (p, ref) in enumerate(zip(chosen, pending, strict=True))]

    def _result(self, shard: int, process: ActorHandle, call: Callable[[ActorHandle, int], Any], ref: Any) -> Any:
        for attempt in range(RETRIES + 1):
            try:
                return ray.get(ref)
            except (*DIED, StaleShard) as e:
                # A dead process, or one of another memory version (a rolling update under way): another may
                # answer. A shard's own exception arrives as a RayTaskError that is also an instance of it.
                if attempt == RETRIES:
                    raise ShardsUnavailable(f"{self.handles[shard].deployment_name}: no replica answered: {e}") from e
                if attempt == 0:
                    log.warning("a shard process failed a call, asking another: %s", type(e).__name__)
                if isinstance(e, DIED):
                    self._forget(shard, process)
                self.retried += 1
                if attempt:  # the first at once (another process), the rest paced: a version switch takes a while
                    time.sleep(RETRY_PAUSE_S)
                process = self._pick(shard)
                ref = call(process, shard)
        raise AssertionError("unreachable")

    def load(self, directory: Path) -> list[ShardInfo]:
        """Every replica's process of every shard loads `directory`'s shard: ArtifactError naming the shard where
        one refuses it, so that the version is not switched to; the old one keeps serving. A process that dies
        during the load is not a refusal: the live ones are asked again (loading is idempotent), and the one
        Serve starts in its place loads the version on its first call for it. A shard with no replica running yet
        (the application starting) is waited for, as long as a load may take."""
        self.refresh()
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        asked = [self._ask_load(s, directory) for s in range(len(self.handles))]
        return [self._loaded(s, asked[s], directory, deadline) for s in range(len(self.handles))]

    def _ask_load(self, shard: int, directory: Path) -> list[tuple[ActorHandle, Any]]:
        with self.lock:
            return [(p, p.load.remote(str(directory))) for p in self.processes[shard]]

    def _loaded(self, shard: int, asked: list[tuple[ActorHandle, Any]], directory: Path, deadline: float) -> ShardInfo:
        name = self.handles[shard].deployment_name
        while True:
            answers = []
            for process, ref in asked:
                try:
                    answers.append(ray.get(ref, timeout=max(1.0, deadline - time.monotonic())))
                except DIED:
                    log.warning("%s: a replica ended while loading %s", name, directory)
                    self._forget(shard, process)
                except Exception as e:  # its refusal, or no answer by the deadline
                    raise ArtifactError(f"{name}: a replica could not load {directory}: {e}") from e
            if answers:
                if len(set(answers)) != 1:
                    raise ArtifactError(f"{name}: its replicas answered {answers} for {directory}")
                return answers[0]
            if time.monotonic() > deadline:
                raise ArtifactError(f"{name}: no live replica loaded {directory} ({self.why[shard]})")
            time.sleep(RELOAD_PAUSE_S)
            self.refresh()
            asked = self._ask_load(shard, directory)

    def release(self, version: str) -> None:
        """Every known process lets `version` go (not waited for: one that misses it holds it until it ends)."""
        with self.lock:
            known = [p for ps in self.processes for p in ps]
        for p in known:
            p.drop.remote(version)

    def search(self, z: np.ndarray, k: int, every_list: bool, spec: FilterSpec | None, at: At) -> list[Answer]:
        return self._all(lambda p, s: p.search.remote(z, k, every_list, spec, at))

    def gather(
        self, ids: Sequence[np.ndarray], keys: bool, values: bool, at: At
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        return self._all(lambda p, s: p.gather.remote(ids[s], keys, values, at))


def check_shards(shards_dir: Path, expected: int) -> list[Path]:
    """The shard directories, where their number is the one the config expects (0: any)."""
    dirs = shard_dirs(resolve(shards_dir))
    if expected and len(dirs) != expected:
        raise ArtifactError(f"{shards_dir} holds {len(dirs)} shards, the config says {expected}")
    return dirs
