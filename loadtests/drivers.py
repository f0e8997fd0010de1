"""The load drivers `rac bench` and its siblings use, each in a process of its own (so that its CPU is its own),
and what a run cost the server: wrk (HTTP/1.1, prepared bodies cycled by a Lua script), the gRPC drivers
(loadtests/grpc_load.cc, native; loadtests/v2load.py in Python) and the overload generator
(loadtests/overload.py); `measured` wraps any of them with the server's CPU per request (read from its
processes), the driver's, and the mean batch the server formed. wrk and the gRPC drivers also say how the
server's processes shared their connections (`connections_per_process`, read halfway through the run).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from loadtests import multipart, v2load
from loadtests.overload import write_bodies
from loadtests.server import ROOT, scrape

GRPC_LOAD = ROOT / ".cache/bin/rac-grpc-load"  # the native gRPC driver (make grpc-load)

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


def spread(port: int) -> list[int]:
    """How many established connections to `port` each process serving it holds, most first. Processes that
    share a port by SO_REUSEPORT (gRPC) get each connection by a hash of its addresses, so a few connections may
    well fall unevenly; processes that share one listening socket (uvicorn) get it by whoever accepts first."""
    found = psutil.net_connections("tcp")
    held = Counter(c.pid for c in found if c.pid and c.laddr and c.laddr.port == port and c.status == "ESTABLISHED")
    return sorted(held.values(), reverse=True)


class Spread(threading.Thread):
    """spread(port) while a driver runs: read once `after_s` in, then every half second until all `expected`
    connections are open (a driver in Python opens its callers' one by one, and a connection sent on to another
    process is briefly closed) or result() is asked for; the reading that saw most of them is kept. Reading it
    costs the machine some CPU (psutil looks through every process's sockets): once a run, where all are open."""

    def __init__(self, port: int, after_s: float, expected: int):
        super().__init__(daemon=True)
        self.port, self.after_s, self.expected = port, after_s, expected
        self.counts: list[int] = []
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        wait = self.after_s
        while not self.done.wait(wait):
            counts, wait = spread(self.port), 0.5
            if sum(counts) > sum(self.counts):
                self.counts = counts
            if sum(self.counts) >= self.expected:
                return

    def result(self) -> list[int]:
        self.done.set()
        self.join()
        return self.counts


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
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(script)]
    env = {"WRK_OUT": str(result), "WRK_CONTENT_TYPE": content_type} | ({"WRK_HEADER": header[0]} if header else {})
    cpu, held = children_cpu(), Spread(int(urlsplit(url).port or 80), seconds / 2, connections)
    done = subprocess.run([*cmd, url, "--", str(data)], capture_output=True, text=True, env=os.environ | env)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stdout}{done.stderr}")
    stats: dict[str, Any] = json.loads(result.read_text())
    stats["connections_per_process"] = held.result()
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
    target: str, images: list[bytes], concurrency: int, seconds: float, workdir: Path, processes: int = 0
) -> dict[str, Any]:
    """ModelInfer, one image a request, each caller on its own connection, prepared requests: by the native
    driver (processes 0: loadtests/grpc_load.cc, built by `make grpc-load`; one thread, as wrk is for HTTP), or
    by loadtests/v2load.py's grpc.aio callers in that many Python processes. Both report the CPU they used while
    measuring as client_cores."""
    requests, out = workdir / f"grpc-{concurrency}.bin", workdir / f"grpc-{concurrency}.json"
    write_bodies(requests, [v2load.grpc_request(png) for png in images])
    if processes == 0:
        if not GRPC_LOAD.exists():
            raise RuntimeError(f"{GRPC_LOAD} is missing: build it with `make grpc-load`")
        cmd = [str(GRPC_LOAD), target, str(requests), str(concurrency), str(seconds), str(out)]
    else:
        cmd = [sys.executable, "-m", "loadtests.v2load", "--target", target, "--requests", str(requests)]
        cmd += ["--concurrency", str(concurrency), "--seconds", str(seconds), "--out", str(out)]
        cmd += ["--processes", str(processes)]
    held = Spread(int(target.rsplit(":", 1)[1]), seconds / 2, concurrency)
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=seconds + 120)
    if done.returncode != 0:
        raise RuntimeError(f"the gRPC load driver failed: {done.stdout}{done.stderr}")
    stats: dict[str, Any] = json.loads(out.read_text())
    stats["connections_per_process"] = held.result()
    return stats


def overload(url: str, bodies: list[bytes], connections: int, seconds: float, workdir: Path) -> dict[str, Any]:
    """One overload level through loadtests/overload.py in its own process; adds the server's cache errors,
    its resident memory at the end (all its processes) and the generator's own CPU. `requests` and
    `req_per_s` are the successful ones."""
    data = workdir / f"overload-{connections}.bin"
    write_bodies(data, bodies)
    errors = scrape(url).get('rac_cache_total{result="error"}', 0.0)
    cpu = children_cpu()
    cmd = [sys.executable, "-m", "loadtests.overload", "--url", url, "--connections", str(connections)]
    done = subprocess.run([*cmd, "--seconds", str(seconds), "--bodies", str(data)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"overload run failed: {done.stderr}")
    stats: dict[str, Any] = json.loads(done.stdout)
    stats["requests"], stats["req_per_s"] = stats["statuses"].get("200", 0), stats["ok_per_s"]
    stats["client_cores"] = (children_cpu() - cpu) / stats["seconds"]
    stats["cache_errors"] = scrape(url).get('rac_cache_total{result="error"}', 0.0) - errors
    stats["server_rss_mb"] = sum(p.memory_info().rss for p in server_tree(url)) / 2**20
    return stats


def server_processes(url: str) -> list[psutil.Process]:
    """The processes with a socket on the server's port: each server process listening, and with several, their
    supervisor, which holds the port bound."""
    port = int(url.rsplit(":", 1)[1])
    pids = {c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.pid}
    return [psutil.Process(p) for p in sorted(pids)]


def server_tree(url: str) -> list[psutil.Process]:
    """Every process of the server: the supervisor (`python -m service`) and all its children (multiprocessing's
    resource tracker, and server processes that do not listen at the moment)."""
    tree: dict[int, psutil.Process] = {}
    for p in server_processes(url):
        parent = p.parent()
        top = parent if parent is not None and "service" in parent.cmdline() else p
        for q in [top, *top.children(recursive=True)]:
            tree[q.pid] = q
    return list(tree.values())


def measured(url: str, processes: list[psutil.Process], drive: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One load run, with what it cost per (successful) request: the server's CPU (all its processes, read from
    them; the part its batches took, rac_batch_cpu_seconds, and the rest, with its event loops' share of it),
    the driver's, and the mean size of the batches the server ran meanwhile and how many of each size
    (rac_batch_size)."""

    def cpu() -> tuple[float, float]:
        """All the processes' CPU seconds, and their main threads' (a server process's event loop)."""
        loops = sum(t.user_time + t.system_time for p in processes for t in p.threads() if t.id == p.pid)
        return sum(sum(p.cpu_times()[:2]) for p in processes), loops

    before, (used, loops) = scrape(url), cpu()
    stats = drive()
    after, (total, loops_after) = scrape(url), cpu()
    used, loops = total - used, loops_after - loops
    batches = after.get("rac_batch_size_count", 0.0) - before.get("rac_batch_size_count", 0.0)
    images = after.get("rac_batch_size_sum", 0.0) - before.get("rac_batch_size_sum", 0.0)
    in_batches = after.get("rac_batch_cpu_seconds_total", 0.0) - before.get("rac_batch_cpu_seconds_total", 0.0)
    collecting = sum(v - before.get(k, 0.0) for k, v in after.items() if k.startswith("rac_gc_cpu_seconds_total{"))
    n = max(1, stats["requests"])
    stats["server_cpu_ms_per_request"] = 1000 * used / n
    # The same CPU split by thread: the batches' (their worker threads: the pipeline) and the rest (the request
    # path: HTTP, framework, cache, answers; the supervisor's and gRPC's threads too).
    stats["batch_cpu_ms_per_image"] = 1000 * in_batches / images if images else None
    stats["outside_batches_cpu_ms_per_request"] = 1000 * (used - in_batches) / n
    # ... of which the event loops' (HTTP, the framework, the service's own Python); the rest is other threads'
    # (gRPC's own, for a gRPC run)
    stats["event_loop_cpu_ms_per_request"] = 1000 * loops / n
    stats["gc_cpu_ms_per_request"] = 1000 * collecting / n  # the garbage collector's passes, in any thread
    stats["server_cores"] = used / stats["seconds"]
    stats["client_cpu_ms_per_request"] = 1000 * stats["client_cores"] * stats["seconds"] / n
    stats["mean_batch"] = images / batches if batches else None
    stats["batch_sizes"] = batch_sizes(before, after)
    return stats


def batch_sizes(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """How many batches of each size the server ran between two scrapes, by rac_batch_size's buckets: "4" counts
    the batches of 3 or 4 images (over the bucket below, at most its bound)."""
    bounds = sorted(
        (float(key.split('le="')[1].split('"')[0]), after[key] - before.get(key, 0.0))
        for key in after
        if key.startswith("rac_batch_size_bucket{")
    )
    sizes, below = {}, 0.0
    for bound, cumulative in bounds:
        if cumulative - below:
            sizes[f"{bound:g}"] = round(cumulative - below)
        below = cumulative
    return sizes
