"""`rac bench`: what serving costs on top of the model, measured in one run on one machine.

    rac bench --artifacts artifacts/demo --json results/bench.json

1. in-process ceiling: decode + encode + search + head over distinct images, in batches of max_batch, no HTTP
2. the raw encoder alone in onnxruntime, batch 1 to 64
3. HTTP throughput and p50/p99 latency at several concurrencies, every request a new image (cache misses),
   driven by wrk (one thread, a Lua script cycling through prepared multipart bodies)
4. the same for the Open Inference Protocol, at each concurrency right after /classify: v2 REST driven by wrk
   with prepared binary-tensor bodies (as tritonclient.http sends them), and gRPC driven by a separate process
   (loadtests/v2load.py: grpc.aio, one connection per caller, prepared requests)
5. cache-hit latency: one image, over and over, one connection
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from loadtests import multipart, v2load
from loadtests.images import pngs
from loadtests.server import ROOT, free_port, scrape, serving
from service import artifacts as A
from service.decode import decode
from service.metrics import Metrics
from service.pipeline import Job, Pipeline
from service.settings import Settings

LUA = r"""
local bodies, extras, n, i, header = {}, {}, 0, 0, nil
function init(args)
  local f = assert(io.open(args[1], "rb"))
  local data = f:read("*all")
  f:close()
  local pos = 1
  while pos <= #data do  -- records "<length>[ <header value>]\n<body>"
    local nl = string.find(data, "\n", pos, true)
    local len, extra = string.match(string.sub(data, pos, nl - 1), "^(%d+) ?(.*)$")
    len = tonumber(len)
    n = n + 1
    bodies[n], extras[n] = string.sub(data, nl + 1, nl + len), extra
    pos = nl + 1 + len
  end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = os.getenv("WRK_CONTENT_TYPE")
  header = os.getenv("WRK_HEADER")  -- a header whose value differs per body (Inference-Header-Content-Length)
end
function request()
  i = i + 1
  local k = (i - 1) % n + 1
  if header then wrk.headers[header] = extras[k] end
  return wrk.format(nil, nil, nil, bodies[k])
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


def wrk(
    url: str,
    bodies: list[bytes],
    connections: int,
    seconds: float,
    workdir: Path,
    content_type: str = multipart.CONTENT_TYPE,
    header: tuple[str, list[str]] | None = None,  # a header's name, and its value for each body
) -> dict[str, Any]:
    data = workdir / f"bodies-{connections}.bin"
    v2load.write_records(data, bodies, header[1] if header else None)
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
        url,
        "--",
        str(data),
    ]
    env = {"WRK_OUT": str(result), "WRK_CONTENT_TYPE": content_type} | ({"WRK_HEADER": header[0]} if header else {})
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | env)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stdout}{done.stderr}")
    stats: dict[str, Any] = json.loads(result.read_text())
    stats["req_per_s"] = stats["requests"] / stats["seconds"]
    return stats


def v2_http(url: str, images: list[bytes], connections: int, seconds: float, workdir: Path) -> dict[str, Any]:
    """POST /v2/models/rac/infer with the binary tensor data extension, one image a request, by wrk."""
    bodies, lengths = zip(*(v2load.http_body(png) for png in images), strict=True)
    header = (v2load.HEADER_LENGTH, [str(n) for n in lengths])
    target = f"{url}/v2/models/rac/infer"
    return wrk(target, list(bodies), connections, seconds, workdir, "application/octet-stream", header)


def v2_grpc(target: str, images: list[bytes], concurrency: int, seconds: float, workdir: Path) -> dict[str, Any]:
    """ModelInfer, one image a request, from a separate process (loadtests/v2load.py)."""
    requests, out = workdir / f"grpc-{concurrency}.bin", workdir / f"grpc-{concurrency}.json"
    v2load.write_records(requests, [v2load.grpc_request(png) for png in images])
    cmd = [sys.executable, "-m", "loadtests.v2load", "--target", target, "--requests", str(requests)]
    cmd += ["--concurrency", str(concurrency), "--seconds", str(seconds), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"the gRPC load driver failed: {done.stdout}{done.stderr}")
    stats: dict[str, Any] = json.loads(out.read_text())
    return stats


def main(artifacts: Path, out: Path, seconds: float, concurrency: str) -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk (or `make bench`)")
    levels = [int(c) for c in concurrency.split(",")]
    # The in-process ceiling is one process with every core; the served process count is the server's own.
    settings = Settings(artifacts=artifacts, workers=1)
    print("preparing images ...", flush=True)
    # Enough distinct images that no measurement runs out (and repeats, hitting the cache) below 1,500 req/s.
    share = max(2_000, round(1_500 * seconds))
    apis = ("http", "v2_http", "v2_grpc")
    images = list(itertools.islice(pngs(), 4096 + share * len(levels) * len(apis)))
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
    own = ("RAC_ARTIFACTS", "RAC_HOST", "RAC_PORT", "RAC_GRPC_PORT")  # serving() and this run choose these
    overrides = {k: v for k, v in os.environ.items() if k.startswith("RAC_") and k not in own}
    results["settings"] |= overrides
    grpc_port = free_port()
    with serving(artifacts, RAC_GRPC_PORT=str(grpc_port), **overrides) as url, tempfile.TemporaryDirectory() as tmp:
        for api in apis:
            results[api] = {}
        used = 4096  # the images the in-process run used are never sent: every request is a miss
        for c in levels:  # the three APIs back to back at each concurrency, each with its own new images
            for api in apis:
                print(f"{api}, {c} connections ...", flush=True)
                batch, used = images[used : used + share], used + share
                if api == "http":
                    bodies = [multipart.encode([("image", p)]) for p in batch]
                    results[api][str(c)] = wrk(f"{url}/classify", bodies, c, seconds, Path(tmp))
                elif api == "v2_http":
                    results[api][str(c)] = v2_http(url, batch, c, seconds, Path(tmp))
                else:
                    results[api][str(c)] = v2_grpc(f"127.0.0.1:{grpc_port}", batch, c, seconds, Path(tmp))
        print("cache hits ...", flush=True)
        hit = [multipart.encode([("image", images[0])])]
        results["cache_hit"] = wrk(f"{url}/classify", hit, 1, min(seconds, 5.0), Path(tmp))
        results["server_cache"] = {
            key.split("{")[1].rstrip("}"): v for key, v in scrape(url).items() if key.startswith("rac_cache_total{")
        }
    top = str(max(levels))
    ceiling = results["in_process"]["img_per_s"]
    results["ratios"] = {
        f"http_c{top}_over_in_process": results["http"][top]["req_per_s"] / ceiling,
        f"http_c{top}_p99_over_p50": results["http"][top]["p99_ms"] / results["http"][top]["p50_ms"],
        "in_process_over_encoder_b32": ceiling / results["encoder"]["32"],
        f"v2_http_c{top}_over_http": results["v2_http"][top]["req_per_s"] / results["http"][top]["req_per_s"],
        f"v2_grpc_c{top}_over_v2_http": results["v2_grpc"][top]["req_per_s"] / results["v2_http"][top]["req_per_s"],
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
    return "\n".join(lines) + "\n\n" + protocol_table(r)


def protocol_table(r: dict[str, Any]) -> str:
    """/classify next to the Open Inference Protocol's REST and gRPC paths, measured back to back."""
    lines = [
        "| API | concurrency | req/s | p50 ms | p99 ms | errors | vs /classify |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = {"http": "POST /classify", "v2_http": "v2 REST (binary)", "v2_grpc": "v2 gRPC"}
    for c in r["http"]:
        for api, name in names.items():
            s = r[api][c]
            ratio = s["req_per_s"] / r["http"][c]["req_per_s"]
            errors = s.get("non_2xx", 0) + s.get("socket_errors", 0) + s.get("non_ok", 0)
            lines.append(
                f"| {name} | {c} | {s['req_per_s']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {errors} "
                f"| {ratio:.2f} |"
            )
    return "\n".join(lines)
