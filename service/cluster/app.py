"""The service on Ray Serve: one ingress deployment running the Pipeline (decode, micro-batched encode, head,
cache, metrics, the same HTTP API) and one deployment per memory shard, each holding its shard memory-mapped.
The ingress's memory is a ShardedMemory whose calls fan out to the shards' handles and are merged.

    rac memory shard --from artifacts/demo --shards 2 --out /data/rac/demo-shards
    serve run deploy/ray/serve.yaml          # a local or remote cluster (RAY_ADDRESS), blocking
    serve deploy deploy/ray/serve.yaml       # a running cluster's dashboard address; KubeRay: a RayService

The application's arguments (shard directory, shard count, replicas, CPUs, the service's settings) come from
the Serve config file (RayConfig below). This is the only module that imports Ray: the single-machine service
(`python -m service`) never does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import ray
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve import Application
from ray.serve.deployment import Deployment
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from service.artifacts import ArtifactError, read_manifest, resolve
from service.memory.shards import Answer, At, FilterSpec, Shard, ShardInfo, ShardsUnavailable, StaleShard, shard_dirs

log = logging.getLogger(__name__)

# A replica that dies under a request fails that call: it is asked again (the handle routes it to a live
# replica once it has seen the death), at most this many times, this far apart.
RETRIES = 20
RETRY_PAUSE_S = 0.05
# How long every replica of a shard may take to load (and pre-fault) a new memory version.
LOAD_TIMEOUT_S = 600.0
RELOAD_PAUSE_S = 0.5  # before asking a shard's live replicas again when one ended during a load


class RayConfig(BaseModel):
    """The `args` of the application in the Serve config file."""

    model_config = ConfigDict(extra="forbid")

    # What `rac memory shard --out` wrote, or a serving root whose `current` link names one (published with
    # `rac memory publish`: the ingress follows it and switches every shard to a new version together); an
    # absolute path every node can read.
    shards_dir: Path
    shards: int = 0  # the shard count the config expects (checked against shards_dir); 0: whatever is there
    shard_replicas: int = 2  # replicas of each shard deployment
    shard_cpus: float = 0.25  # logical CPUs each shard replica reserves
    shard_threads: int = 1  # FAISS threads per shard replica
    ingress_replicas: int = 1
    ingress_cpus: float = 0.25
    # Requests Serve hands one ingress replica at once; its Pipeline's admission (max_pending) refuses beyond.
    ingress_max_ongoing: int = 256
    # The ingress's service settings (service/settings.py field names; e.g. redis_url, max_batch).
    settings: dict[str, Any] = {}


class ShardServer:
    """Shard number `shard` of each memory version the ingress serves, memory-mapped: its best k of a batch of
    queries, and its rows by id. It holds the version the root names when it starts; the ingress has every
    replica load a new version (a broadcast) before it switches, and lets the old one go after. A replica
    started later (in place of one that died) loads a version on the first call for it."""

    def __init__(self, root: str, shard: int, threads: int):
        self.shard, self.threads = shard, threads
        self.versions: dict[str, Shard] = {}
        self.lock = threading.Lock()
        self.load(str(resolve(Path(root))))

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


class RayShards:
    """The ShardClient over the shard deployments' handles: every call goes to all shards at once, and a call
    a dying replica dropped is asked again. Called from the pipeline's batch thread (blocking is fine there)."""

    def __init__(self, handles: Sequence[DeploymentHandle]):
        self.handles = list(handles)
        self.retried = 0  # calls asked again after a replica failed them

    def _all(self, call: Callable[[DeploymentHandle], Any]) -> list[Any]:
        pending = [call(h) for h in self.handles]
        return [self._result(h, call, response) for h, response in zip(self.handles, pending, strict=True)]

    def _result(self, handle: DeploymentHandle, call: Callable[[DeploymentHandle], Any], response: Any) -> Any:
        for attempt in range(RETRIES + 1):
            try:
                return response.result()
            except (ray.exceptions.RayActorError, ReplicaUnavailableError, StaleShard) as e:
                # A dead replica, or one of another memory version (a rolling update under way): another may
                # answer. A replica's own exception arrives as a RayTaskError that is also an instance of it.
                if attempt == RETRIES:
                    raise ShardsUnavailable(f"{handle.deployment_name}: no replica answered: {e}") from e
                if attempt == 0:
                    log.warning("a shard replica failed a call, asking again: %s", type(e).__name__)
                self.retried += 1
                time.sleep(RETRY_PAUSE_S)
                response = call(handle)
            except (DeploymentUnavailableError, BackPressureError) as e:
                raise ShardsUnavailable(f"{handle.deployment_name}: {e}") from e
        raise AssertionError("unreachable")

    def load(self, directory: Path) -> list[ShardInfo]:
        """Every replica of every shard loads `directory`'s shard (Serve's broadcast): ArtifactError naming the
        shard where one refuses it, so that the version is not switched to; the old one keeps serving. A replica
        that dies during the load is not a refusal: the live ones are asked again (loading is idempotent), and
        the one Serve starts in its place loads the version on its first call for it."""
        pending = [h.broadcast("load", str(directory)) for h in self.handles]
        return [self._loaded(h, response, directory) for h, response in zip(self.handles, pending, strict=True)]

    def _loaded(self, handle: DeploymentHandle, response: Any, directory: Path) -> ShardInfo:
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while True:
            try:
                answers = response.results(timeout_s=max(1.0, deadline - time.monotonic()))
            except (ray.exceptions.RayActorError, ReplicaUnavailableError) as e:
                if time.monotonic() > deadline:
                    raise ArtifactError(f"{handle.deployment_name}: no live replica loaded {directory}: {e}") from e
                log.warning(
                    "%s: a replica ended while loading %s, asking the live ones again",
                    handle.deployment_name,
                    directory,
                )
                time.sleep(RELOAD_PAUSE_S)
                response = handle.broadcast("load", str(directory))
                continue
            except Exception as e:
                raise ArtifactError(f"{handle.deployment_name}: a replica could not load {directory}: {e}") from e
            if not answers or len(set(answers)) != 1:
                raise ArtifactError(f"{handle.deployment_name}: its replicas answered {answers} for {directory}")
            return answers[0]

    def release(self, version: str) -> None:
        """Every replica lets `version` go (not waited for: a replica that misses it holds it until it ends)."""
        for h in self.handles:
            h.broadcast("drop", version)

    def search(self, z: np.ndarray, k: int, every_list: bool, spec: FilterSpec | None, at: At) -> list[Answer]:
        return self._all(lambda h: h.search.remote(z, k, every_list, spec, at))

    def gather(
        self, ids: Sequence[np.ndarray], keys: bool, values: bool, at: At
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        by_handle = dict(zip(map(id, self.handles), ids, strict=True))
        return self._all(lambda h: h.gather.remote(by_handle[id(h)], keys, values, at))


class Ingress:
    """The service's HTTP API (service.app.create_app) over a ShardedMemory reaching the shard deployments."""

    def __init__(self, config: dict[str, Any], *shards: DeploymentHandle):
        self.config = RayConfig.model_validate(config)
        for h in shards:
            # The pipeline calls the shards from its batch thread, not the replica's event loop: the handles'
            # router needs a loop of its own (the default, except under RAY_SERVE_THROUGHPUT_OPTIMIZED=1).
            if not h.is_initialized:
                h._init(_run_router_in_separate_loop=True)
        self.client = RayShards(shards)

    def __serve_build_asgi_app__(self) -> FastAPI:
        from service.app import create_app
        from service.memory.versions import sharded
        from service.settings import Settings

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        # The Open Inference Protocol's gRPC port, where the settings give one (off by default): the ingress's
        # own servicer, the single-process service's. Replicas on one node share it (SO_REUSEPORT), as the
        # server processes of `python -m service` do, and the encoder threads are shared among them likewise.
        replicas = self.config.ingress_replicas
        fields = {"grpc_port": 0, "workers": replicas, **self.config.settings, "artifacts": self.config.shards_dir}
        return create_app(Settings(**fields), open_memory=sharded(self.client))


# The deployments, wrapped here rather than decorated: serve.deployment is annotated as returning the decorator
# even when handed the class, so the casts tell the type checker what it returns.
ShardDeployment = cast(Deployment, serve.deployment(ShardServer))
IngressDeployment = cast(Deployment, serve.deployment(serve.ingress()(Ingress)))


def build(args: dict[str, Any]) -> Application:
    """The application a Serve config's `import_path: service.cluster.app:build` names, from its `args`."""
    config = RayConfig.model_validate(args)
    dirs = shard_dirs(resolve(config.shards_dir))
    if config.shards and len(dirs) != config.shards:
        raise ArtifactError(f"{config.shards_dir} holds {len(dirs)} shards, the config says {config.shards}")
    # One OpenMP thread per process unless asked: replicas share the node's cores.
    env = {"env_vars": {"OMP_NUM_THREADS": str(config.shard_threads)}}
    shards = [
        ShardDeployment.options(
            name=f"shard-{s}",
            num_replicas=config.shard_replicas,
            max_ongoing_requests=16,
            ray_actor_options={"num_cpus": config.shard_cpus, "runtime_env": env},
        ).bind(str(config.shards_dir), s, config.shard_threads)
        for s in range(len(dirs))
    ]
    ingress = IngressDeployment.options(
        name="ingress",
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=config.ingress_max_ongoing,
        ray_actor_options={"num_cpus": config.ingress_cpus},
    )
    return ingress.bind(config.model_dump(mode="json"), *shards)
