"""`rac bench`: what serving costs on top of the model, measured in one run on one machine.

    rac bench --artifacts artifacts/demo --json results/bench.json

1. in-process ceiling: decode + encode + search + head over distinct images, in batches of max_batch, no HTTP
2. the raw encoder alone in onnxruntime, batch 1 to 64
3. HTTP throughput and p50/p99 latency at several concurrencies, every request a new image (cache misses),
   driven by wrk (one thread, a Lua script cycling through prepared multipart bodies)
4. cache-hit latency: one image, over and over, one connection
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from loadtests import multipart
from loadtests.images import pngs
from loadtests.server import scrape, serving
from service import artifacts as A
from service.decode import decode
from service.metrics import Metrics
from service.pipeline import Job, Pipeline
from service.settings import Settings

LUA = r"""
local bodies, n, i = {}, 0, 0
function init(args)
  local f = assert(io.open(args[1], "rb"))
  local data = f:read("*all")
  f:close()
  local pos = 1
  while pos <= #data do
    local nl = string.find(data, "\n", pos, true)
    local len = tonumber(string.sub(data, pos, nl - 1))
    n = n + 1
    bodies[n] = string.sub(data, nl + 1, nl + len)
    pos = nl + 1 + len
  end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = os.getenv("WRK_CONTENT_TYPE")
end
function request()
  i = i + 1
  return wrk.format(nil, nil, nil, bodies[(i - 1) % n + 1])
end
function done(summary, latency, requests)
  local f = assert(io.open(os.getenv("WRK_OUT"), "w"))  -- done() runs in its own Lua state: no init args
  f:write(string.format('{"requests": %d, "seconds": %f, "non_2xx": %d, "socket_errors": %d, ' ..
    '"p50_ms": %f, "p90_ms": %f, "p99_ms": %f, "max_ms": %f}',
    summary.requests, summary.duration / 1e6, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3, latency.max / 1e3))
  f:close()
end
"""


def in_process(settings: Settings, images: list[bytes]) -> dict[str, Any]:
    pipeline = Pipeline(settings, Metrics())
    pipeline.warmup()
    b = settings.max_batch
    t = time.perf_counter()
    for s in range(0, len(images), b):
        jobs = [Job(decode(data, pipeline.spec, settings.max_pixels), None, 0) for data in images[s : s + b]]
        pipeline.run_batch(jobs)
    seconds = time.perf_counter() - t
    return {"images": len(images), "batch": b, "img_per_s": len(images) / seconds}


def raw_encoder(settings: Settings, seconds: float = 2.0) -> dict[str, float]:
    from service.encode import Encoder

    manifest = A.read_manifest(settings.artifacts)
    size = int(manifest.encoder.input["size"])
    encoder = Encoder(settings.artifacts / A.ENCODER, settings.device, settings.encoder_threads, settings.encoder_spin)
    out = {}
    for b in (1, 2, 4, 8, 16, 32, 64):
        x = np.random.default_rng(0).standard_normal((b, 3, size, size)).astype(np.float32)
        encoder(x)
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            encoder(x)
            n += b
        out[str(b)] = n / (time.perf_counter() - t)
    return out


def wrk(url: str, bodies: list[bytes], connections: int, seconds: float, workdir: Path) -> dict[str, Any]:
    data = workdir / f"bodies-{connections}.bin"
    with data.open("wb") as f:
        for body in bodies:
            f.write(f"{len(body)}\n".encode() + body)
    script, result = workdir / "bench.lua", workdir / f"wrk-{connections}.json"
    script.write_text(LUA)
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"{url}/classify",
        "--",
        str(data),
    ]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=os.environ | {"WRK_OUT": str(result), "WRK_CONTENT_TYPE": multipart.CONTENT_TYPE},
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stdout}{done.stderr}")
    stats: dict[str, Any] = json.loads(result.read_text())
    stats["req_per_s"] = stats["requests"] / stats["seconds"]
    return stats


def main(artifacts: Path, out: Path, seconds: float, concurrency: str) -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk (or `make bench`)")
    levels = [int(c) for c in concurrency.split(",")]
    # The in-process ceiling is one process with every core; the served process count is the server's own.
    settings = Settings(artifacts=artifacts, workers=1)
    print("preparing images ...", flush=True)
    images = list(itertools.islice(pngs(), 60_000))
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "settings": {
            "max_batch": settings.max_batch,
            "max_wait_ms": settings.max_wait_ms,
            "workers": Settings().processes,  # the served processes: RAC_WORKERS, else one per core
        },
    }
    print("in-process ceiling ...", flush=True)
    results["in_process"] = in_process(settings, images[:4096])
    print("raw encoder ...", flush=True)
    results["encoder"] = raw_encoder(settings)
    # The caller's RAC_* settings apply to the served process as they do to the in-process run.
    own = ("RAC_ARTIFACTS", "RAC_HOST", "RAC_PORT")  # serving() chooses these
    overrides = {k: v for k, v in os.environ.items() if k.startswith("RAC_") and k not in own}
    results["settings"] |= overrides
    with serving(artifacts, **overrides) as url, tempfile.TemporaryDirectory() as tmp:
        results["http"] = {}
        used = 4096  # the images the in-process run used are never sent: every request is a miss
        for c in levels:
            print(f"HTTP, {c} connections ...", flush=True)
            share = (len(images) - used) // len(levels)
            bodies = [multipart.encode([("image", p)]) for p in images[used : used + share]]
            used += share
            results["http"][str(c)] = wrk(url, bodies, c, seconds, Path(tmp))
        print("cache hits ...", flush=True)
        results["cache_hit"] = wrk(url, [multipart.encode([("image", images[0])])], 1, min(seconds, 5.0), Path(tmp))
        results["server_cache"] = {
            key.split("{")[1].rstrip("}"): v for key, v in scrape(url).items() if key.startswith("rac_cache_total{")
        }
    top = str(max(levels))
    ceiling = results["in_process"]["img_per_s"]
    results["ratios"] = {
        f"http_c{top}_over_in_process": results["http"][top]["req_per_s"] / ceiling,
        f"http_c{top}_p99_over_p50": results["http"][top]["p99_ms"] / results["http"][top]["p50_ms"],
        "in_process_over_encoder_b32": ceiling / results["encoder"]["32"],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"\nwrote {out}")


def table(r: dict[str, Any]) -> str:
    lines = [
        f"in-process ceiling (decode+encode+search+head, batch {r['in_process']['batch']}): "
        f"{r['in_process']['img_per_s']:.0f} img/s",
        "raw encoder: " + ", ".join(f"b{b} {v:.0f}" for b, v in r["encoder"].items()) + " img/s",
        "",
        "| concurrency | req/s | p50 ms | p99 ms | non-2xx | vs in-process |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c, s in r["http"].items():
        ratio = s["req_per_s"] / r["in_process"]["img_per_s"]
        lines.append(
            f"| {c} | {s['req_per_s']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['non_2xx']} | {ratio:.2f} |"
        )
    h = r["cache_hit"]
    lines.append(f"| 1 (cache hit) | {h['req_per_s']:.0f} | {h['p50_ms']:.2f} | {h['p99_ms']:.2f} | {h['non_2xx']} | |")
    return "\n".join(lines)
