"""The method's claim through HTTP: the shipped head, no retraining, no restart; only the memory changes, live.

    python -m loadtests.memory_curve --artifacts artifacts/demo --json results/memory_curve.json

From the demo memory with its external items removed (the long-tailed training set only), the external items
are added back (10%, 30%, 100% of them, as PNG files and a list file with their noisy alt-text) with
`rac memory add` and published; one running server (two processes) swaps to each version while it serves,
and the balanced test set is classified over HTTP after each swap. Then the reverse: the external items are
removed again. Last, p50/p99 latency of single-image requests in steady state and while versions are
published back and forth. Writes everything to --json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from loadtests.server import scrape, serving
from models.build.artifact import config_from_manifest, load_data
from models.memory import ops
from models.memory.add import add
from models.memory.make import memory_items
from service.artifacts import ITEMS, read_manifest

BATCH = 32


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def classify_all(url: str, images: list[bytes], version: str, params: dict[str, str] | None = None) -> np.ndarray:
    """(n,) top-1 class of every image over HTTP (/classify/batch), each answer checked to come from `version`
    (`params`: more query parameters, a filter say)."""
    chunks = [list(range(s, min(s + BATCH, len(images)))) for s in range(0, len(images), BATCH)]

    def post(rows: list[int]) -> list[int]:
        files = [("images", (f"{r}.png", images[r], "image/png")) for r in rows]
        r = httpx.post(f"{url}/classify/batch", files=files, params={"top_k": 1, **(params or {})}, timeout=120)
        r.raise_for_status()
        out = []
        for e in r.json()["results"]:
            assert e["status"] == 200 and e["result"]["memory_version"] == version, e
            out.append(e["result"]["predictions"][0]["index"])
        return out

    with ThreadPoolExecutor(4) as pool:
        return np.concatenate([np.asarray(p) for p in pool.map(post, chunks)])


def accuracy(pred: np.ndarray, labels: np.ndarray, buckets: dict[str, str], classes: list[str]) -> dict[str, float]:
    bucket_of = np.asarray([buckets[classes[y]] for y in labels])
    out = {"all": round(100 * float((pred == labels).mean()), 2)}
    for b in ("many", "mid", "few"):
        mask = bucket_of == b
        out[b] = round(100 * float((pred[mask] == labels[mask]).mean()), 2)
    return out


def wait_for(url: str, version: str, probe: bytes, timeout: float = 300) -> float:
    """Until 20 answers in a row come from `version` (every process swapped); returns the seconds waited."""
    t0, streak = time.monotonic(), 0
    while streak < 20:
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"the server did not swap to {version}")
        r = httpx.post(f"{url}/classify", files={"image": ("p.png", probe, "image/png")}, timeout=30)
        r.raise_for_status()
        streak = streak + 1 if r.json()["memory_version"] == version else 0
        if not streak:
            time.sleep(0.1)
    return time.monotonic() - t0


def latency(url: str, images: list[bytes], seconds: float, during: threading.Event | None = None) -> dict[str, Any]:
    """p50/p99 of single-image requests from 4 clients over `seconds` (while `during` is set by the caller)."""
    times: list[float] = []
    failed = [0]
    stop = time.monotonic() + seconds

    def client(n: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            i = n
            while time.monotonic() < stop:
                t = time.perf_counter()
                r = http.post("/classify", files={"image": ("x.png", images[i % len(images)], "image/png")})
                times.append(time.perf_counter() - t)
                failed[0] += r.status_code != 200
                i += 4

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(client, range(4)))
    ms = 1000 * np.asarray(times)
    return {
        "requests": len(times),
        "failed": failed[0],
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=Path("artifacts/demo"), help="a flat build (only read)")
    p.add_argument("--work", type=Path, default=Path("/tmp/rac-memory-curve"), help="versions, PNGs (wiped)")
    p.add_argument("--json", type=Path, default=Path("results/memory_curve.json"))
    p.add_argument("--fractions", default="0.1,0.3,1.0")
    p.add_argument("--test-limit", type=int, default=0, help="classify only this many test images (0: all)")
    p.add_argument("--latency-s", type=float, default=15.0)
    a = p.parse_args()

    manifest = read_manifest(a.artifacts)
    cfg = config_from_manifest(manifest, a.artifacts, Path(".cache/rac"))
    dataset, splits = load_data(cfg.data)
    items = memory_items(dataset, splits, cfg.sources, cfg.noise, cfg.data.seed)  # the demo's rows, in order
    shutil.rmtree(a.work, ignore_errors=True)
    root, pngs = a.work / "root", a.work / "external"
    pngs.mkdir(parents=True)
    with sqlite3.connect(f"file:{a.artifacts / ITEMS}?mode=ro", uri=True) as db:
        texts = [r[0] for r in db.execute("SELECT text FROM items ORDER BY id")]
    assert texts == items.text, "the demo's item table is not what models.memory.make.memory_items makes"
    external = np.flatnonzero(items.source == "external")
    (a.work / "external.ids").write_text("\n".join(map(str, external)))

    # The external items as a user would add them: PNG files and a list file with their (noisy) texts.
    pool = dataset.pools["train"]
    order = np.random.default_rng(0).permutation(external)
    lines = []
    for n in order:
        name = f"{items.index[n]}.png"
        pool.image(int(items.index[n])).save(pngs / name)
        lines.append(f"{name} {items.label[n]}\t{items.text[n]}")
    fractions = [float(f) for f in a.fractions.split(",")]
    cuts = [0, *(round(f * len(order)) for f in fractions)]
    for s, e, f in zip(cuts, cuts[1:], fractions, strict=False):
        (pngs / f"add-{f:g}.txt").write_text("\n".join(lines[s:e]) + "\n")

    test = splits.test
    limit = a.test_limit or len(test.index)
    labels = dataset.labels(test)[:limit]
    images = [png(dataset.pools[test.pool].image(int(i))) for i in test.index[:limit]]
    buckets, classes = manifest.evaluation["buckets"], manifest.classes
    t = time.perf_counter()
    ops.remove(a.artifacts, root / "downstream", a.work / "external.ids")
    timings = {"remove_external_s": round(time.perf_counter() - t, 1)}
    ops.publish(root / "downstream", root)
    rows: list[dict[str, Any]] = []
    env = {"RAC_WORKERS": "2", "RAC_MEMORY_POLL_S": "1"}
    with serving(root, **env) as url:

        def measure(name: str, directory: Path, external_items: int) -> None:
            version = read_manifest(directory).memory_version
            swap_wait = wait_for(url, version, images[0])
            pred = classify_all(url, images, version)
            row = {
                "memory": name,
                "version": version,
                "external_items": external_items,
                "items": read_manifest(directory).memory.size,
                "seen_after_s": round(swap_wait, 2),
                "test_top1": accuracy(pred, labels, buckets, classes),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)

        measure("downstream only", root / "downstream", 0)
        previous, added = root / "downstream", 0
        for s, e, f in zip(cuts, cuts[1:], fractions, strict=False):
            out = root / f"external-{f:g}"
            t = time.perf_counter()
            add(previous, pngs / f"add-{f:g}.txt", out)
            timings[f"add_{e - s}_s"] = round(time.perf_counter() - t, 1)
            ops.publish(out, root)
            added += e - s
            measure(f"+ {100 * f:g}% external", out, added)
            previous = out
        full = previous
        # The reverse: the external items taken out again (their ids in the full version).
        with sqlite3.connect(f"file:{full / ITEMS}?mode=ro", uri=True) as db:
            ids = [r[0] for r in db.execute("SELECT id FROM items WHERE source = 'external'")]
        (a.work / "again.ids").write_text("\n".join(map(str, ids)))
        ops.remove(full, root / "removed-again", a.work / "again.ids")
        ops.publish(root / "removed-again", root)
        measure("external removed again", root / "removed-again", 0)

        # Latency: steady state, then while versions are published back and forth every 3 s.
        steady = latency(url, images, a.latency_s)
        swapping = threading.Event()
        swaps = [0]

        def flip() -> None:
            targets = [full, root / "removed-again"]
            while swapping.is_set():
                ops.publish(targets[swaps[0] % 2], root)
                swaps[0] += 1
                time.sleep(3.0)

        swapping.set()
        flipper = threading.Thread(target=flip)
        flipper.start()
        during = latency(url, images, a.latency_s)
        swapping.clear()
        flipper.join()
        metrics = scrape(url)

    result = {
        "command": "python -m loadtests.memory_curve "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "load_avg_end": os.getloadavg(),  # the last 1, 5 and 15 minutes: was the host otherwise idle?
        },
        "head": f"the shipped head of {a.artifacts} (memory version {manifest.memory_version}), never retrained",
        "offline_test_top1_of_the_build": manifest.evaluation["test"]["accuracy"],
        "test_images": limit,
        "rows": rows,
        "latency": {"steady": steady, "publishing_every_3s": during | {"publishes": swaps[0]}},
        "swaps": {k: v for k, v in metrics.items() if k.startswith(("rac_memory_swap", "rac_memory_load"))},
        "timings": timings,
    }
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["latency"]), f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
