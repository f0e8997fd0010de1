"""Filtered search measured: /classify with a filter keeping about half and about a twentieth of the memory,
next to no filter, and the memory ablation as a request parameter (accuracy with `source=downstream`).

    python -m loadtests.filters --artifacts artifacts/demo --json results/filters.json
    python -m loadtests.filters --artifacts artifacts/demo --scale .cache/scale/1m --json results/filters.json

For each memory (the demo's, and a scale memory made by `rac memory synth` where --scale names one), a tagged
version is derived with `rac memory tag` (tag `half` on the items with an even id, `twentieth` on every
twentieth id: the same items, keys, values and index), served by `python -m service` (two processes), and
driven by wrk at 16 connections with distinct images (every request a cache miss): no filter, `tag=half`,
`tag=twentieth`. Then the balanced test set is classified over HTTP with no filter and with
`source=downstream` (the demo memory only). Writes everything to --json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from loadtests import multipart
from loadtests.bench import wrk
from loadtests.images import pngs
from loadtests.memory_curve import accuracy, classify_all, png
from loadtests.server import serving
from models.memory import ops
from models.memory.rows import parent_ids
from service.artifacts import read_manifest

FILTERS = {"none": "", "half": "tag=half", "twentieth": "tag=twentieth"}


def tagged(src: Path, work: Path) -> Path:
    """src with tags `half` (even ids) and `twentieth` (ids divisible by 20), as `rac memory tag` makes them."""
    ids = parent_ids(src)
    (work / "half.txt").write_text("\n".join(map(str, ids[ids % 2 == 0])))
    (work / "twentieth.txt").write_text("\n".join(map(str, ids[ids % 20 == 0])))
    ops.tag(src, work / "half", work / "half.txt", None, ["half"], [])
    ops.tag(work / "half", work / "tagged", work / "twentieth.txt", None, ["twentieth"], [])
    return work / "tagged"


def speed(artifacts: Path, work: Path, seconds: float, connections: int) -> dict[str, Any]:
    images = pngs()
    out: dict[str, Any] = {"items": read_manifest(artifacts).memory.size}
    with serving(artifacts, RAC_WORKERS="2") as url:
        for name, query in FILTERS.items():
            print(f"{artifacts.name}: {name} ...", flush=True)
            # Images of its own for each run: none was seen before, so no part of an answer comes from the cache.
            bodies = [multipart.encode([("image", png)]) for png in itertools.islice(images, 4000)]
            r = wrk(f"{url}/classify?{query}", bodies, connections, seconds, work)
            out[name] = {k: round(v, 3) for k, v in r.items() if isinstance(v, float | int)}
    for name in ("half", "twentieth"):
        out[f"{name}_p50_over_none"] = round(out[name]["p50_ms"] / out["none"]["p50_ms"], 3)
        out[f"{name}_req_per_s_over_none"] = round(out[name]["req_per_s"] / out["none"]["req_per_s"], 3)
    return out


def ablation(artifacts: Path) -> dict[str, Any]:
    """Test top-1 through HTTP: the whole memory, and the downstream items alone (a filter, not a rebuild)."""
    from models.build.artifact import config_from_manifest, load_data

    manifest = read_manifest(artifacts)
    data, splits = load_data(config_from_manifest(manifest, artifacts, Path(".cache/rac")).data)
    test = splits.test
    images = [png(data.pools[test.pool].image(int(i))) for i in test.index]
    labels = data.labels(test)
    buckets = manifest.evaluation.get("buckets", {})
    out = {}
    with serving(artifacts, RAC_WORKERS="2") as url:
        for name, params in (("all items", {}), ("source=downstream", {"source": "downstream"})):
            print(f"accuracy, {name} ...", flush=True)
            pred = classify_all(url, images, manifest.memory_version, params)
            out[name] = accuracy(pred, labels, buckets, manifest.classes)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=Path("artifacts/demo"))
    p.add_argument("--scale", type=Path, help="a scale memory (rac memory synth) measured the same way")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--json", type=Path, default=Path("results/filters.json"))
    a = p.parse_args()
    result: dict[str, Any] = {
        "command": "python -m loadtests.filters "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v is not None),
        "host": {"cpus": len(os.sched_getaffinity(0)), "machine": platform.machine()},
    }
    with tempfile.TemporaryDirectory(prefix="rac-filters-") as tmp:
        for name, memory in (("demo", a.artifacts), ("scale", a.scale)):
            if memory is None:
                continue
            work = Path(tmp) / name
            work.mkdir()
            result[name] = speed(tagged(memory, work), work, a.seconds, a.connections)
            print(json.dumps(result[name], indent=1), flush=True)
    result["accuracy"] = ablation(a.artifacts)
    print(json.dumps(result["accuracy"], indent=1))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
