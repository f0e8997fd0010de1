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

from service import artifacts as A
from service.shards import Answer, Shard, ShardInfo, ShardsUnavailable, shard_dirs

log = logging.getLogger(__name__)

# A replica that dies under a request fails that call: it is asked again (the handle routes it to a live
# replica once it has seen the death), at most this many times, this far apart.
RETRIES = 20
RETRY_PAUSE_S = 0.05


class RayConfig(BaseModel):
    """The `args` of the application in the Serve config file."""

    model_config = ConfigDict(extra="forbid")

    shards_dir: Path  # what `rac memory shard --out` wrote: an absolute path every node can read
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
    """One memory shard, memory-mapped: its best k of a batch of queries, and its rows by id."""

    def __init__(self, directory: str, nprobe: int, threads: int):
        self.shard = Shard(Path(directory), nprobe, threads)

    def describe(self) -> ShardInfo:
        return self.shard.info

    def search(self, z: np.ndarray, k: int, exhaustive: bool) -> Answer:
        return self.shard.search(z, k, exhaustive)

    def gather(self, ids: np.ndarray, keys: bool, values: bool) -> tuple[np.ndarray, np.ndarray]:
        return self.shard.gather(ids, keys, values)


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
            except (ray.exceptions.RayActorError, ReplicaUnavailableError) as e:
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

    def describe(self) -> list[ShardInfo]:
        return self._all(lambda h: h.describe.remote())

    def search(self, z: np.ndarray, k: int, exhaustive: bool) -> list[Answer]:
        return self._all(lambda h: h.search.remote(z, k, exhaustive))

    def gather(self, ids: Sequence[np.ndarray], keys: bool, values: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        by_handle = dict(zip(map(id, self.handles), ids, strict=True))
        return self._all(lambda h: h.gather.remote(by_handle[id(h)], keys, values))


class Ingress:
    """The service's HTTP API (service.app.create_app) over a ShardedMemory reaching the shard deployments."""

    def __init__(self, config: dict[str, Any], *shards: DeploymentHandle):
        self.config = RayConfig.model_validate(config)
        self.client = RayShards(shards)

    def __serve_build_asgi_app__(self) -> FastAPI:
        from service.app import create_app
        from service.settings import Settings
        from service.versions import sharded

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        # gRPC off: every ingress replica of a node would want the same port.
        fields = {**self.config.settings, "artifacts": self.config.shards_dir, "grpc_port": 0}
        return create_app(Settings(**fields), open_memory=sharded(self.client))


# The deployments, wrapped here rather than decorated: serve.deployment is annotated as returning the decorator
# even when handed the class, so the casts tell the type checker what it returns.
ShardDeployment = cast(Deployment, serve.deployment(ShardServer))
IngressDeployment = cast(Deployment, serve.deployment(serve.ingress()(Ingress)))


def build(args: dict[str, Any]) -> Application:
    """The application a Serve config's `import_path: service.ray_app:build` names, from its `args`."""
    config = RayConfig.model_validate(args)
    dirs = shard_dirs(config.shards_dir)
    if config.shards and len(dirs) != config.shards:
        raise A.ArtifactError(f"{config.shards_dir} holds {len(dirs)} shards, the config says {config.shards}")
    nprobe = A.read_manifest(config.shards_dir).index.nprobe
    # One OpenMP thread per process unless asked: replicas share the node's cores.
    env = {"env_vars": {"OMP_NUM_THREADS": str(config.shard_threads)}}
    shards = [
        ShardDeployment.options(
            name=f"shard-{s}",
            num_replicas=config.shard_replicas,
            max_ongoing_requests=16,
            ray_actor_options={"num_cpus": config.shard_cpus, "runtime_env": env},
        ).bind(str(d), nprobe, config.shard_threads)
        for s, d in enumerate(dirs)
    ]
    ingress = IngressDeployment.options(
        name="ingress",
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=config.ingress_max_ongoing,
        ray_actor_options={"num_cpus": config.ingress_cpus},
    )
    return ingress.bind(config.model_dump(mode="json"), *shards)
