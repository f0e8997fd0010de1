"""The embedding step of `rac memory add` (the listed images decoded, embedded by the version's encoder, their
texts by the text encoder, thumbnails made), in this process and on Ray Data over a local two-node cluster
(loadtests/ray_cluster.py: one logical CPU a node), for the same images on the same cores. Needs the `ray`
extra.

    python -m loadtests.ray_add --artifacts artifacts/demo --images 16000 --json results/ray_build.json

From the cluster's steady rate per CPU (after its first batch: the actors' start-up is a constant), the
time to embed 100M and 1B items on N nodes of --node-cpus CPUs each: an estimate that assumes the rate per
CPU holds as nodes are added (the work is per image, nothing shared but the list), and that reading the
images keeps up.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from loadtests.images import pngs
from loadtests.ray_cluster import ray_cluster
from models.data import FileImages
from models.memory.add import embed_here
from models.memory.make import PROMPT, thumbnail_bytes
from models.memory.ray_embed import embed_on_ray
from service.artifacts import ENCODER, read_manifest

SIZES = {"100M": 100_000_000, "1B": 1_000_000_000}
NODES = (1, 10, 100)


def main(artifacts: Path, n: int, node_cpus: int, out: Path) -> None:
    manifest = read_manifest(artifacts)
    dims = (manifest.encoder.dim, manifest.memory.value_dim)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = []
        for i, data in enumerate(itertools.islice(pngs(), n)):
            (root / f"{i}.png").write_bytes(data)
            paths.append(f"{i}.png")
        texts = [PROMPT.format(manifest.classes[i % len(manifest.classes)].lower()) for i in range(n)]
        images = FileImages(root, paths, np.zeros(n, np.int64))
        print(f"{n} images, here ...", flush=True)
        t = time.perf_counter()
        here_keys, _ = embed_here(artifacts / ENCODER, manifest.encoder.input, images, texts, dims)
        [thumbnail_bytes(images.image(i)) for i in range(n)]
        here_s = time.perf_counter() - t
        print("on Ray (two nodes, one CPU each) ...", flush=True)
        with ray_cluster() as cluster:
            os.environ["RAY_ADDRESS"] = cluster.address
            t = time.perf_counter()
            timings: dict[str, float] = {}
            ray_keys, _, _ = embed_on_ray(
                artifacts / ENCODER, manifest.encoder.input, root, paths, texts, dims, timings
            )
            ray_s = time.perf_counter() - t
            ray.shutdown()
    # Steady: after the first batch is back (the connection, planning and the actors' start-up are behind it),
    # as for a memory of millions of images, where that start-up is a constant.
    steady = (n - timings["first_batch_rows"]) / (timings["seconds"] - timings["first_batch_s"])
    per_cpu = steady / 2
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count()},
        "images": n,
        "encoder": manifest.encoder.name,
        "single_process": {"seconds": here_s, "images_per_s": n / here_s},
        "ray": {
            "nodes": 2,
            "cpus_per_node": 1,
            "seconds": ray_s,
            "images_per_s": n / ray_s,
            "start_up_s": timings["first_batch_s"],
            "steady_images_per_s": steady,
        },
        "ray_over_single": here_s / ray_s,
        "ray_steady_over_single": steady / (n / here_s),
        "keys_max_abs_diff": float(np.abs(ray_keys - here_keys).max()),
        "estimate": {
            "images_per_s_per_cpu": per_cpu,
            "node_cpus": node_cpus,
            "hours": {
                size: {str(nodes): count / (per_cpu * node_cpus * nodes) / 3600 for nodes in NODES}
                for size, count in SIZES.items()
            },
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(
        f"here {n / here_s:.0f} images/s, on Ray {n / ray_s:.0f} images/s ({results['ray_over_single']:.2f} of here), "
        f"{steady:.0f} images/s after the first batch ({results['ray_steady_over_single']:.2f} of here)"
    )
    for size, by_nodes in results["estimate"]["hours"].items():
        print(f"  {size}: " + ", ".join(f"{h:.1f} h on {nodes} x {node_cpus} CPUs" for nodes, h in by_nodes.items()))
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/demo"))
    parser.add_argument("--images", type=int, default=16000)
    parser.add_argument("--node-cpus", type=int, default=16, help="CPUs per node in the estimate")
    parser.add_argument("--json", type=Path, default=Path("results/ray_build.json"))
    a = parser.parse_args()
    main(a.artifacts, a.images, a.node_cpus, a.json)
