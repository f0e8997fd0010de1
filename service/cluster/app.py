"""The service on Ray Serve: one ingress deployment running the Pipeline (decode, micro-batched encode, head,
cache, metrics, the same HTTP API) and one deployment per memory shard, each replica owning a process that
holds the shard memory-mapped (service/cluster/shards.py). The ingress's memory is a ShardedMemory whose calls
fan out to those processes and are merged.

    rac memory shard --from artifacts/demo --shards 2 --out /data/rac/demo-shards
    serve run deploy/ray/serve.yaml          # a local or remote cluster (RAY_ADDRESS), blocking
    serve deploy deploy/ray/serve.yaml       # a running cluster's dashboard address; KubeRay: a RayService

The application's arguments (shard directory, shard count, replicas, CPUs, the service's settings) come from
the Serve config file (RayConfig below). Only this package imports Ray: the single-machine service
(`python -m service`) never does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve import Application
from ray.serve.deployment import Deployment
from ray.serve.handle import DeploymentHandle

from service.cluster.shards import RayShards, ShardReplica, check_shards

log = logging.getLogger(__name__)
HEALTH_PERIOD_S = 2.0  # how often Serve asks a shard replica whether its process is alive


class RayConfig(BaseModel):
    """The `args` of the application in the Serve config file."""

    model_config = ConfigDict(extra="forbid")

    # What `rac memory shard --out` wrote, or a serving root whose `current` link names one (published with
    # `rac memory publish`: the ingress follows it and switches every shard to a new version together); an
    # absolute path every node can read.
    shards_dir: Path
    shards: int = 0  # the shard count the config expects (checked against shards_dir); 0: whatever is there
    shard_replicas: int = 2  # replicas of each shard deployment
    shard_cpus: float = 0.25  # logical CPUs each shard replica's process reserves
    shard_threads: int = 1  # FAISS threads per shard process
    ingress_replicas: int = 1
    ingress_cpus: float = 0.25
    # Requests Serve hands one ingress replica at once; its Pipeline's admission (max_pending) refuses beyond.
    ingress_max_ongoing: int = 256
    # The ingress's service settings (service/settings.py field names; e.g. redis_url, max_batch).
    settings: dict[str, Any] = {}


class Ingress:
    """The service's HTTP API (service.app.create_app) over a ShardedMemory reaching the shard deployments."""

    def __init__(self, config: dict[str, Any], *shards: DeploymentHandle):
        self.config = RayConfig.model_validate(config)
        for h in shards:
            # The pipeline asks the deployments for their processes (a broadcast) from its batch thread, not the
            # replica's event loop: the handles' router needs a loop of its own (the default, except under
            # RAY_SERVE_THROUGHPUT_OPTIMIZED=1).
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
ShardDeployment = cast(Deployment, serve.deployment(ShardReplica))
IngressDeployment = cast(Deployment, serve.deployment(serve.ingress()(Ingress)))


def build(args: dict[str, Any]) -> Application:
    """The application a Serve config's `import_path: service.cluster.app:build` names, from its `args`."""
    config = RayConfig.model_validate(args)
    dirs = check_shards(config.shards_dir, config.shards)
    # A shard replica reserves no CPU itself: its shard process (which it starts) reserves shard_cpus.
    shards = [
        ShardDeployment.options(
            name=f"shard-{s}",
            num_replicas=config.shard_replicas,
            health_check_period_s=HEALTH_PERIOD_S,
            ray_actor_options={"num_cpus": 0},
        ).bind(str(config.shards_dir), s, config.shard_threads, config.shard_cpus)
        for s in range(len(dirs))
    ]
    ingress = IngressDeployment.options(
        name="ingress",
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=config.ingress_max_ongoing,
        ray_actor_options={"num_cpus": config.ingress_cpus},
    )
    return ingress.bind(config.model_dump(mode="json"), *shards)
