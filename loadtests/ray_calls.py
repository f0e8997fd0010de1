"""What one call from the ingress to the shards costs on Ray: the shipped deployment's client (RayShards, the
way the ingress calls the shard processes: over a connection of its own to each), against the same search
through a Serve deployment's handle (Serve's router in the way: a deployment of the same class, deployed for
this), as a Ray actor call to a plain actor of the class, and a plain actor call that searches nothing, from
one process on the same local two-node cluster, one call at a time. Needs the `ray` extra.

    python -m loadtests.ray_calls --shards-dir /tmp/rac-ray-bench/shards --json results/ray_calls.json

--shards-dir: a sharded memory (`rac memory shard --out`) of two shards.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import ray
from ray import serve
from ray.serve.deployment import Deployment

from loadtests.ray_cluster import ray_cluster
from loadtests.server import free_port
from service.artifacts import read_manifest
from service.cluster.shards import RayShards, ShardServer
from service.memory.shards import At, shard_dirs


def timed(call: Callable[[], object], n: int) -> dict[str, float]:
    """Milliseconds a call: p50 and p90 of n, after 20 not counted."""
    for _ in range(20):
        call()
    ms = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        ms.append(1000 * (time.perf_counter() - t))
    return {"p50_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "calls": n}


@ray.remote(num_cpus=0)
class Echo:
    """A plain actor: the query back, nothing searched."""

    def echo(self, z: np.ndarray) -> np.ndarray:
        return z


def main(shards_dir: Path, out: Path, n: int) -> dict[str, Any]:
    shards_dir = shards_dir.resolve()
    manifest = read_manifest(shards_dir)
    count = len(shard_dirs(shards_dir))
    at = At(manifest.memory_version, str(shards_dir))
    z = np.random.default_rng(0).standard_normal((1, manifest.encoder.dim)).astype(np.float32)
    k = manifest.index.k
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "shards": count, "k": k, "replicas_per_shard": 2}
    with ray_cluster() as cluster:
        cluster.deploy(shards_dir, free_port(), shards=count, shard_replicas=2, settings={})
        ray.init(address=cluster.address, log_to_driver=False)
        handles = [serve.get_deployment_handle(f"shard-{s}", app_name="rac") for s in range(count)]
        one, every = RayShards(handles[:1]), RayShards(handles)
        results["ingress_one_shard"] = timed(lambda: one.search(z, k, False, None, at), n)
        results["ingress_every_shard"] = timed(lambda: every.search(z, k, False, None, at), n)
        routed = [
            serve.run(
                cast(Deployment, serve.deployment(ShardServer))
                .options(num_replicas=2, ray_actor_options={"num_cpus": 0})
                .bind(str(shards_dir), s, 1),
                name=f"routed-{s}",
                route_prefix=None,
            )
            for s in range(count)
        ]
        results["serve_handle_one_shard"] = timed(lambda: routed[0].search.remote(z, k, False, None, at).result(), n)
        results["serve_handle_every_shard"] = timed(
            lambda: [r.result() for r in [h.search.remote(z, k, False, None, at) for h in routed]], n
        )
        plain: Any = ray.remote(num_cpus=0)(ShardServer).remote(str(shards_dir), 0, 1)
        results["plain_actor_search"] = timed(lambda: ray.get(plain.search.remote(z, k, False, None, at)), n)
        echo = Echo.remote()  # type: ignore[attr-defined]
        results["plain_actor_call"] = timed(lambda: ray.get(echo.echo.remote(z)), n)
        ray.shutdown()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards-dir", type=Path, default=Path("/tmp/rac-ray-bench/shards"), help="as make ray-bench cuts")
    ap.add_argument("--json", type=Path, default=Path("results/ray_calls.json"))
    ap.add_argument("--calls", type=int, default=300)
    a = ap.parse_args()
    r = main(a.shards_dir, a.json, a.calls)
    for name in (
        "ingress_one_shard",
        "ingress_every_shard",
        "serve_handle_one_shard",
        "serve_handle_every_shard",
        "plain_actor_search",
        "plain_actor_call",
    ):
        print(f"{name}: p50 {r[name]['p50_ms']:.2f} ms, p90 {r[name]['p90_ms']:.2f} ms")
    print(f"wrote {a.json}")
