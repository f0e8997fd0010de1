"""`rac bench --memory`: the service over scale memories of 100k, 1M and 10M items, built from the demo
memory plus synthetic items (or reused from the cache), measured from a cold start:

    nice -n 19 rac bench --memory --sizes 100000,1000000,10000000 --json results/memory_scale.json

Per size: build time, index / keys / values / item table on disk, start-up time to /readyz (pages of the
memory evicted from the page cache first, so this includes pre-faulting them), PSS of the server's anonymous
(non-file-mapped) memory, latency at batch 1 and 32 of the requests right after /readyz through HTTP (wall
clock, and the server's own search time), and search + gather in-process (a fresh Pipeline, evicted pages,
timed from its first call). Writes the JSON and an SVG plot beside it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from loadtests.images import pngs
from loadtests.server import ROOT, free_port
from models.memory.scale import MEMORY_FILES, SynthConfig, synth
from service.artifacts import INDEX, KEYS, MANIFEST, VALUES, read_manifest

NAMES = {100_000: "100k", 1_000_000: "1m", 10_000_000: "10m"}


def evict(directory: Path) -> None:
    """Drop this memory's files (only them) from the page cache: each start is a cold start."""
    for name in MEMORY_FILES:
        fd = os.open(directory / name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def pss_anon_mb(pid: int) -> float:
    """Proportional set size of the process's anonymous memory: what it holds beyond the mapped files."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss_Anon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no Pss_Anon in smaps_rollup (Linux 5.x+ needed)")


def percentiles(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def memory_for(size: int, source: Path, cache: Path) -> tuple[Path, float]:
    """The cached scale memory of this size grown from `source`, built if absent; and its build time (s)."""
    out = cache / NAMES.get(size, str(size))
    want = read_manifest(source).memory_version
    if (out / MANIFEST).exists():
        m = read_manifest(out)
        s = m.build.get("synth", {})
        if m.memory.size == size and s.get("from_version") == want:
            return out, float(sum(s.get("seconds", {}).values()))
    t = time.perf_counter()
    synth(source, out, SynthConfig(size=size))
    return out, time.perf_counter() - t


def http(directory: Path, images: list[bytes], requests: int) -> dict[str, Any]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAC_") and k != "REDIS_URL"}
    # gRPC off: never the well-known 8001 of a demo running on this machine.
    env |= {"RAC_ARTIFACTS": str(directory), "RAC_PORT": str(port), "RAC_WORKERS": "1", "RAC_GRPC_PORT": "0"}
    url = f"http://127.0.0.1:{port}"
    evict(directory)
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=log, stderr=log)
        try:
            with httpx.Client(timeout=120) as client:
                while True:
                    if proc.poll() is not None:
                        log.seek(0)
                        raise RuntimeError(f"the service exited:\n{log.read()}")
                    try:
                        if client.get(f"{url}/readyz").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.05)
                out: dict[str, Any] = {"startup_s": round(time.perf_counter() - t0, 2)}
                out["pss_anon_mb"] = round(pss_anon_mb(proc.pid), 1)
                used = 0
                for batch in (1, 32):
                    wall, search = [], []
                    route, field = ("/classify", "image") if batch == 1 else ("/classify/batch", "images")
                    for _ in range(requests if batch == 1 else max(10, requests // 8)):
                        files = [(field, ("q.png", images[used + i], "image/png")) for i in range(batch)]
                        used += batch
                        t = time.perf_counter()
                        r = client.post(f"{url}{route}", files=files)
                        wall.append(1000 * (time.perf_counter() - t))
                        r.raise_for_status()
                        body = r.json()
                        first = body if batch == 1 else body["results"][0]["result"]
                        search.append(first["timings_ms"]["search"])
                    out[f"batch{batch}"] = {"wall": percentiles(wall), "server_search": percentiles(search)}
        finally:
            proc.terminate()
            proc.wait(30)
    return out


def in_process(directory: Path, images: list[bytes], requests: int) -> dict[str, Any]:
    """A fresh Pipeline on evicted pages: start-up (checks + pre-fault) and search + gather from the first call."""
    from service.core.decode import decode
    from service.core.pipeline import Pipeline
    from service.metrics import Metrics
    from service.settings import Settings

    evict(directory)
    t = time.perf_counter()
    pipeline = Pipeline(Settings(artifacts=directory, workers=1), Metrics())
    pipeline.warmup()
    out: dict[str, Any] = {"startup_s": round(time.perf_counter() - t, 2)}
    pixels = np.stack([decode(b, pipeline.spec, 10**7) for b in images[: requests + 32 * max(10, requests // 8)]])
    z = pipeline.encoder(pixels)  # (n, d)
    mem, used = pipeline.version.memory, 0
    for batch in (1, 32):
        search, total = [], []
        for _ in range(requests if batch == 1 else max(10, requests // 8)):
            q = z[used : used + batch]
            used += batch
            t = time.perf_counter()
            _, ids = mem.search(q, pipeline.k)
            s = time.perf_counter()
            mem.gather(ids, pipeline.head.uses_keys, pipeline.head.uses_values)
            search.append(1000 * (s - t))
            total.append(1000 * (time.perf_counter() - t))
        out[f"batch{batch}"] = {"search": percentiles(search), "search_gather": percentiles(total)}
    pipeline.version.memory.close()
    return out


def disk_mb(directory: Path) -> dict[str, float]:
    return {name: round((directory / name).stat().st_size / 1e6, 1) for name in MEMORY_FILES}


def main(source: Path, sizes: list[int], cache: Path, out: Path, requests: int) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    images = [b for b, _ in zip(pngs(), range(2 * (requests + 32 * max(10, requests // 8))), strict=False)]
    results: dict[str, Any] = {"source": str(source), "cpus": os.cpu_count(), "sizes": {}}
    for size in sizes:
        print(f"{size} items: build or reuse ...", flush=True)
        directory, build_s = memory_for(size, source, cache)
        m = read_manifest(directory)
        r: dict[str, Any] = {"index": m.index.type, "nprobe": m.index.nprobe, "recall_at_k": m.index.recall_at_k}
        r |= {"build_s": round(build_s, 1), "disk_mb": disk_mb(directory)}
        print(f"{size} items: HTTP ...", flush=True)
        r["http"] = http(directory, images[: len(images) // 2], requests)
        print(f"{size} items: in-process ...", flush=True)
        r["in_process"] = in_process(directory, images[len(images) // 2 :], requests)
        results["sizes"][str(size)] = r
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))  # after every size: a long run keeps what it measured
    from loadtests.memory_plot import svg

    out.with_suffix(".svg").write_text(svg(results))
    print(table(results))
    print(f"\nwrote {out} and {out.with_suffix('.svg')}")


def table(r: dict[str, Any]) -> str:
    lines = [
        "| items | index | recall@k | build s | index MB | keys MB | values MB | start-up s | PSS anon MB"
        " | in-proc search+gather p50/p99 ms b1 | b32 | HTTP p50/p99 ms b1 | b32 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for size, s in r["sizes"].items():
        d, h, p = s["disk_mb"], s["http"], s["in_process"]

        def pp(x: dict[str, float]) -> str:
            return f"{x['p50_ms']:.2f} / {x['p99_ms']:.2f}"

        lines.append(
            f"| {int(size):,} | {s['index']} | {s['recall_at_k']} | {s['build_s']:.0f} | {d[INDEX]:.0f}"
            f" | {d[KEYS]:.0f} | {d[VALUES]:.0f} | {h['startup_s']:.1f} | {h['pss_anon_mb']:.0f}"
            f" | {pp(p['batch1']['search_gather'])} | {pp(p['batch32']['search_gather'])}"
            f" | {pp(h['batch1']['wall'])} | {pp(h['batch32']['wall'])} |"
        )
    return "\n".join(lines)
