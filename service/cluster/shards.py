"""A memory shard on Ray: the process that holds it, the Serve replica that owns that process, and the ingress's
client that calls the processes directly.

Each replica of a shard deployment (`shard-0`, `shard-1`, ...) starts one plain Ray actor, its shard process
(ShardServer), and owns it: the process ends with its replica, and a replica whose process died reports itself
unhealthy, so Serve starts another in its place. Serve keeps what it is for: how many replicas, on which nodes,
their restarts and rolling updates. The ingress asks each deployment for its replicas' processes (a broadcast,
again every few seconds and whenever one fails) and sends each search to one of them itself, round robin, over
a connection of its own to the process (service/cluster/wire.py): a shard call pays neither Serve's router nor
Ray's actor call (`python -m loadtests.ray_calls` times the three: results/ray_calls.json). The control calls
(a version's load and release, the health ping) stay Ray actor calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import ray
from ray.actor import ActorHandle
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from service.artifacts import ArtifactError, read_manifest, resolve
from service.cluster.wire import Address, Call, Failed, Gone, Listener, Peer
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
# The process (or its replica) is gone: a Ray call says so, or its connection does.
DIED = (ray.exceptions.RayActorError, ReplicaUnavailableError, Gone)


class ShardServer:
    """Shard number `shard` of each memory version the ingress serves, memory-mapped: its best k of a batch of
    queries, and its rows by id. It holds the version the root names when it starts; the ingress has every
    process load a new version before it switches, and lets the old one go after. A process started later (in
    place of one that died) loads a version on the first call for it."""

    def __init__(self, root: str, shard: int, threads: int):
        self.shard, self.threads = shard, threads
        self.versions: dict[str, Shard] = {}
        self.lock = threading.Lock()  # a load at a time
        self.using = threading.Condition()  # calls in progress, by shard: a drop waits for them to end
        self.busy: Counter[Shard] = Counter()
        self.load(str(resolve(Path(root))))
        self.listener = Listener(self, ("search", "gather"), ray.util.get_node_ip_address())

    def ping(self) -> int:
        return self.shard

    def address(self) -> Address:
        """Where the ingress sends its searches and gathers, with the token that opens a connection."""
        return self.listener.address

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
        """Let `version` go once the calls searching it are done (they run in the listener's threads)."""
        with self.lock:
            gone = self.versions.pop(version, None)
        if gone is not None:
            with self.using:
                self.using.wait_for(lambda: not self.busy[gone])
                del self.busy[gone]
            gone.memory.close()

    def _take(self, at: At) -> Shard | None:
        with self.using:  # looked up and counted at once: a drop either waits for this call or comes before it
            held = self.versions.get(at.version)
            if held is not None:
                self.busy[held] += 1
            return held

    @contextlib.contextmanager
    def _of(self, at: At) -> Iterator[Shard]:
        """The shard of `at`'s version, loaded where not held, kept open while the call uses it."""
        held = self._take(at)
        if held is None:
            self.load(at.directory)
            held = self._take(at)
        if held is None:
            raise StaleShard(f"{at.directory} does not hold memory version {at.version}")
        try:
            yield held
        finally:
            with self.using:
                self.busy[held] -= 1
                self.using.notify_all()

    def search(self, z: np.ndarray, k: int, every_list: bool, spec: FilterSpec | None, at: At) -> Answer:
        with self._of(at) as shard:
            return shard.search(z, k, every_list, spec, at.version)

    def gather(self, ids: np.ndarray, keys: bool, values: bool, at: At) -> tuple[np.ndarray, np.ndarray]:
        with self._of(at) as shard:
            return shard.gather(ids, keys, values, at.version)


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
        self.peers: dict[str, Peer] = {}  # by process: its address and open connections
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
            peer = self.peers.pop(name_of(process), None)
        if peer is not None:
            peer.close()

    def peer(self, process: ActorHandle) -> Peer:
        """The process's connections: its address asked of it (a Ray call) the first time."""
        name = name_of(process)
        with self.lock:
            known = self.peers.get(name)
        if known is not None:
            return known
        try:
            address = cast(Address, ray.get(process.address.remote(), timeout=HEALTH_TIMEOUT_S))
        except ray.exceptions.GetTimeoutError as e:
            raise Gone(f"{name} did not say where it listens: {e}") from e
        with self.lock:
            return self.peers.setdefault(name, Peer(address, LOAD_TIMEOUT_S))  # a call may load a version first

    def _send(self, process: ActorHandle, method: str, args: tuple[Any, ...]) -> Call | Failed:
        try:
            return self.peer(process).send(method, args)
        except DIED as e:
            return Failed(e)

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

    def _all(self, method: str, args: Sequence[tuple[Any, ...]]) -> list[Any]:
        """`method` called on every shard at once (args: by shard), each call to one of its processes."""
        if time.monotonic() - self.refreshed > REFRESH_S:
            self.refresh()
        chosen = [self._pick(s) for s in range(len(self.handles))]
        sent = [self._send(p, method, args[s]) for s, p in enumerate(chosen)]
        return [self._result(s, chosen[s], method, args[s], call) for s, call in enumerate(sent)]

    def _result(self, shard: int, process: ActorHandle, method: str, args: tuple[Any, ...], call: Call | Failed) -> Any:
        for attempt in range(RETRIES + 1):
            try:
                return call.result()
            except (*DIED, StaleShard) as e:
                # A dead process, or one of another memory version (a rolling update under way): another may
                # answer. A shard's own exception arrives as itself.
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
                call = self._send(process, method, args)
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
        return self._all("search", [(z, k, every_list, spec, at)] * len(self.handles))

    def gather(
        self, ids: Sequence[np.ndarray], keys: bool, values: bool, at: At
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        return self._all("gather", [(part, keys, values, at) for part in ids])


def check_shards(shards_dir: Path, expected: int) -> list[Path]:
    """The shard directories, where their number is the one the config expects (0: any)."""
    dirs = shard_dirs(resolve(shards_dir))
    if expected and len(dirs) != expected:
        raise ArtifactError(f"{shards_dir} holds {len(dirs)} shards, the config says {expected}")
    return dirs
