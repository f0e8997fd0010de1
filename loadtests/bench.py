"""`rac bench`: what serving costs on top of the model, measured in one run on one machine.

    rac bench --artifacts artifacts/demo --json results/bench.json

1. in-process ceiling: decode + encode + search + head over distinct images, in batches of max_batch, no HTTP,
   in the server's own layout (its processes and encoder threads per process: loadtests/ceiling.py), and
   the older one-process figure beside it
2. the raw encoder alone in onnxruntime, batch 1 to 64
3. HTTP throughput and p50/p99 latency at several concurrencies, every request a new image (cache misses),
   driven by wrk (one thread, a Lua script cycling through prepared multipart bodies), with the CPU wrk used
4. the same for the Open Inference Protocol, at each concurrency right after /classify: v2 REST driven by wrk
   with prepared binary-tensor bodies (as tritonclient.http sends them), and gRPC driven by a separate process
   (loadtests/v2load.py: grpc.aio, one connection per caller, prepared requests)
5. cache-hit latency: one image, over and over, one connection
6. overload: 64 to 1024 connections of distinct images (loadtests/overload.py): successful and refused
   requests per second, latency of each kind apart, /readyz latency meanwhile, cache errors, server memory
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from loadtests import ceiling, multipart, v2load
from loadtests.images import pngs
from loadtests.overload import write_bodies
from loadtests.server import ROOT, free_port, scrape, serving
from service import artifacts as A
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


def children_cpu() -> float:
    """CPU seconds used by this process's finished children (the load generators)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


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
    write_bodies(data, bodies, header[1] if header else None)
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
    cpu = children_cpu()
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | env)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stdout}{done.stderr}")
    stats: dict[str, Any] = json.loads(result.read_text())
    stats["req_per_s"] = stats["requests"] / stats["seconds"]
    stats["client_cores"] = (children_cpu() - cpu) / stats["seconds"]  # what wrk itself kept busy
    return stats


def v2_http(url: str, images: list[bytes], connections: int, seconds: float, workdir: Path) -> dict[str, Any]:
    """POST /v2/models/rac/infer with the binary tensor data extension, one image a request, by wrk."""
    bodies, lengths = zip(*(v2load.http_body(png) for png in images), strict=True)
    header = (v2load.HEADER_LENGTH, [str(n) for n in lengths])
    target = f"{url}/v2/models/rac/infer"
    return wrk(target, list(bodies), connections, seconds, workdir, "application/octet-stream", header)


def v2_grpc(
    target: str, images: list[bytes], concurrency: int, seconds: float, workdir: Path, processes: int = 1
) -> dict[str, Any]:
    """ModelInfer, one image a request, from a separate process (or several: loadtests/v2load.py; it reports
    the CPU it used while measuring as client_cores)."""
    requests, out = workdir / f"grpc-{concurrency}.bin", workdir / f"grpc-{concurrency}.json"
    write_bodies(requests, [v2load.grpc_request(png) for png in images])
    cmd = [sys.executable, "-m", "loadtests.v2load", "--target", target, "--requests", str(requests)]
    cmd += ["--concurrency", str(concurrency), "--seconds", str(seconds), "--out", str(out)]
    cmd += ["--processes", str(processes)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"the gRPC load driver failed: {done.stdout}{done.stderr}")
    stats: dict[str, Any] = json.loads(out.read_text())
    return stats


def server_processes(url: str) -> list[psutil.Process]:
    """The processes listening on the server's port (uvicorn's supervisor and its workers)."""
    port = int(url.rsplit(":", 1)[1])
    pids = {c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.pid}
    return [psutil.Process(p) for p in sorted(pids)]


def overload(url: str, bodies: list[bytes], connections: int, seconds: float, workdir: Path) -> dict[str, Any]:
    """One overload level through loadtests/overload.py in its own process; adds the server's cache errors,
    its resident memory at the end (all its processes) and the generator's own CPU."""
    data = workdir / f"overload-{connections}.bin"
    write_bodies(data, bodies)
    errors = scrape(url).get('rac_cache_total{result="error"}', 0.0)
    cpu = children_cpu()
    cmd = [sys.executable, "-m", "loadtests.overload", "--url", url, "--connections", str(connections)]
    done = subprocess.run([*cmd, "--seconds", str(seconds), "--bodies", str(data)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"overload run failed: {done.stderr}")
    stats: dict[str, Any] = json.loads(done.stdout)
    stats["client_cores"] = (children_cpu() - cpu) / stats["seconds"]
    stats["cache_errors"] = scrape(url).get('rac_cache_total{result="error"}', 0.0) - errors
    stats["server_rss_mb"] = sum(p.memory_info().rss for p in server_processes(url)) / 2**20
    return stats


def main(artifacts: Path, out: Path, seconds: float, concurrency: str, flood: str = "64,256,1024") -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk (or `make bench`)")
    levels = [int(c) for c in concurrency.split(",")]
    floods = [int(c) for c in flood.split(",") if c]
    settings = Settings(artifacts=artifacts)  # the caller's RAC_* settings, as the served process gets them
    print("preparing images ...", flush=True)
    # Enough distinct images that no measurement runs out (and repeats, hitting the cache) below 1,500 req/s.
    share = max(2_000, round(1_500 * seconds))
    apis = ("http", "v2_http", "v2_grpc")  # /classify and the Open Inference Protocol over REST and gRPC
    flooded = 4096 + share * len(levels) * len(apis)  # where the overload runs' images start
    images = list(itertools.islice(pngs(), flooded + 40_000 * len(floods)))
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "settings": {
            "max_batch": settings.max_batch,
            "max_wait_ms": settings.max_wait_ms,
            "workers": Settings().processes,  # the served processes: RAC_WORKERS, else one per core
        },
    }
    print("in-process ceiling, served layout ...", flush=True)
    results["ceiling"] = {"served_layout": ceiling.served_layout(settings, images[:4096])}
    print("in-process ceiling, one process ...", flush=True)
    results["ceiling"]["single_process"] = ceiling.single_process(settings, images[:4096])
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
        results["overload"] = {}
        used = flooded
        for c in floods:
            print(f"overload, {c} connections ...", flush=True)
            bodies = [multipart.encode([("image", p)]) for p in images[used : used + 40_000]]
            results["overload"][str(c)] = overload(url, bodies, c, seconds, Path(tmp))
            used += 40_000
    top = str(max(levels))
    served = results["ceiling"]["served_layout"]["img_per_s"]
    single = results["ceiling"]["single_process"]["img_per_s"]
    results["ratios"] = {
        f"http_c{top}_over_served_ceiling": results["http"][top]["req_per_s"] / served,
        f"http_c{top}_over_single_process_ceiling": results["http"][top]["req_per_s"] / single,
        f"http_c{top}_p99_over_p50": results["http"][top]["p99_ms"] / results["http"][top]["p50_ms"],
        "served_ceiling_over_encoder_b32": served / results["encoder"]["32"],
        f"v2_http_c{top}_over_http": results["v2_http"][top]["req_per_s"] / results["http"][top]["req_per_s"],
        f"v2_grpc_c{top}_over_v2_http": results["v2_grpc"][top]["req_per_s"] / results["v2_http"][top]["req_per_s"],
    }
    if len(floods) > 1:
        low, high = results["overload"][str(min(floods))], results["overload"][str(max(floods))]
        results["ratios"][f"overload_ok_c{max(floods)}_over_c{min(floods)}"] = high["ok_per_s"] / low["ok_per_s"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"\nwrote {out}")


def table(r: dict[str, Any]) -> str:
    served, single = r["ceiling"]["served_layout"], r["ceiling"]["single_process"]
    lines = [
        f"in-process ceiling (decode+encode+search+head, batch {served['batch']}), served layout "
        f"({served['processes']} processes x {served['encoder_threads']} encoder threads): "
        f"{served['img_per_s']:.0f} img/s, {served['cores_busy']:.2f} cores busy; "
        f"one process: {single['img_per_s']:.0f} img/s, {single['cores_busy']:.2f} cores busy",
        "raw encoder: " + ", ".join(f"b{b} {v:.0f}" for b, v in r["encoder"].items()) + " img/s",
        "",
        "| concurrency | req/s | p50 ms | p99 ms | non-2xx | vs served ceiling | wrk CPU (cores) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c, s in r["http"].items():
        ratio = s["req_per_s"] / served["img_per_s"]
        lines.append(
            f"| {c} | {s['req_per_s']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['non_2xx']} | {ratio:.2f} "
            f"| {s['client_cores']:.2f} |"
        )
    h = r["cache_hit"]
    lines.append(
        f"| 1 (cache hit) | {h['req_per_s']:.0f} | {h['p50_ms']:.2f} | {h['p99_ms']:.2f} | {h['non_2xx']} | "
        f"| {h['client_cores']:.2f} |"
    )
    if r.get("overload"):
        lines += [
            "",
            "| connections | ok/s | refused/s | ok p50 ms | ok p99 ms | refused p99 ms | /readyz p99 ms "
            "| other errors | cache errors | server RSS MB | generator CPU |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c, o in r["overload"].items():
            other = sum(n for s, n in o["statuses"].items() if s not in ("200", "503"))
            lines.append(
                f"| {c} | {o['ok_per_s']:.0f} | {o['refused_per_s']:.0f} | {_ms(o['ok_p50_ms'])} "
                f"| {_ms(o['ok_p99_ms'])} | {_ms(o['refused_p99_ms'])} | {_ms(o['readyz_p99_ms'])} | {other} "
                f"| {o['cache_errors']:.0f} | {o['server_rss_mb']:.0f} | {o['client_cores']:.2f} |"
            )
    return "\n".join(lines) + "\n\n" + protocol_table(r)


def protocol_table(r: dict[str, Any]) -> str:
    """/classify next to the Open Inference Protocol's REST and gRPC paths, measured back to back."""
    lines = [
        "| API | concurrency | req/s | p50 ms | p99 ms | errors | vs /classify | client CPU (cores) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = {"http": "POST /classify", "v2_http": "v2 REST (binary)", "v2_grpc": "v2 gRPC"}
    for c in r["http"]:
        for api, name in names.items():
            s = r[api][c]
            ratio = s["req_per_s"] / r["http"][c]["req_per_s"]
            errors = s.get("non_2xx", 0) + s.get("socket_errors", 0) + s.get("non_ok", 0)
            lines.append(
                f"| {name} | {c} | {s['req_per_s']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {errors} "
                f"| {ratio:.2f} | {s['client_cores']:.2f} |"
            )
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"
