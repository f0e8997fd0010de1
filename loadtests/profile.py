"""Where the served path spends its CPU: the service (its own layout, every request a cache miss, or with
--hits every one a hit) under wrk at 16 connections, each server process sampled by py-spy meanwhile, the
samples summed into the request path's parts (inclusive: a frame counts for every part on its stack, the
first that matches).

    python -m loadtests.profile --artifacts artifacts/demo --json results/profile.json

Writes the JSON (share of samples per part, per process, and the top leaf functions) and the collapsed stacks
beside it (`<json stem>-process<i>.txt`, flamegraph input). py-spy samples at 200 Hz without `--native`: the
onnxruntime and FAISS calls show as their Python caller, which is what a part is named after anyway.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

from loadtests import multipart
from loadtests.drivers import server_tree, wrk
from loadtests.images import pngs
from loadtests.server import serving

# A part of the request path and the frames that mark it (substrings of py-spy's "function (file:line)").
# Order matters: a stack counts for the first part one of whose markers it holds.
PARTS: dict[str, tuple[str, ...]] = {
    "encode (onnxruntime)": ("encode.py", "InferenceSession.run"),
    "search (faiss)": ("memory.py", "search (service/memory"),
    "head (torch)": ("head.py",),
    "decode (Pillow)": ("decode.py",),
    "cache (Redis, keys)": ("cache.py",),
    "multipart parse": ("multipart", "upload.py", "form"),
    "metrics": ("prometheus_client",),
    "response JSON": ("orjson", "_neighbors", "_predictions", "render"),
    "routing (FastAPI, Starlette)": ("fastapi/", "starlette/"),
    "the service's middleware and endpoints": ("service/app.py", "service/api/", "service/v2/", "pipeline.py"),
    "HTTP (uvicorn, h11/httptools)": ("uvicorn/", "httptools", "h11"),
    "event loop, futures, threads": ("asyncio/", "concurrent/futures", "threading.py", "uvloop"),
}
PY_SPY = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
IDLE = ("wait (threading", "select (selectors", "_worker (concurrent", "poll (", "epoll")


def classify(stack: str) -> str:
    for part, markers in PARTS.items():
        if any(m in stack for m in markers):
            return part
    return "other"


def summarise(collapsed: str, top: int = 15) -> dict[str, Any]:
    """Busy samples per part (%), and the leaf functions that hold the most samples."""
    parts: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        leaf = stack.rsplit(";", 1)[-1]
        if not n.isdigit() or any(i in leaf for i in IDLE):
            continue
        parts[classify(stack)] += int(n)
        leaves[leaf] += int(n)
    busy = sum(parts.values()) or 1
    return {
        "busy_samples": busy,
        "parts_pct": {p: round(100 * n / busy, 1) for p, n in parts.most_common()},
        "top_leaves_pct": {f: round(100 * n / busy, 1) for f, n in leaves.most_common(top)},
    }


def workers(url: str) -> list[psutil.Process]:
    """The processes that serve: uvicorn's spawned workers, or the one server process when there are none."""
    tree = server_tree(url)
    spawned = [p for p in tree if "spawn_main" in " ".join(p.cmdline())]
    return spawned or tree


def record(pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes]:
    cmd = [str(PY_SPY), "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "200"]
    cmd += ["--format", "raw", "--output", str(out), "--nonblocking"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def main(artifacts: Path, out: Path, seconds: int, connections: int, hits: bool = False) -> dict[str, Any]:
    """hits: every request sends the same image (cache hits after the first), instead of a new one each."""
    if PY_SPY is None or shutil.which("wrk") is None:
        raise SystemExit("py-spy and wrk are needed: pip install py-spy; apt-get install -y wrk")
    images = list(itertools.islice(pngs(), 1 if hits else 1_500 * (seconds + 4)))
    bodies = [multipart.encode([("image", p)]) for p in images] * (2_001 if hits else 1)
    result: dict[str, Any] = {"connections": connections, "seconds": seconds, "hits": hits, "processes": {}}
    with serving(artifacts) as url, tempfile.TemporaryDirectory() as tmp:
        wrk(f"{url}/classify", bodies[:2_000], connections, 2, Path(tmp))  # warm: first batches, page faults
        procs = workers(url)
        stacks = {p.pid: out.with_name(f"{out.stem}-process{i}.txt") for i, p in enumerate(procs)}
        spies = [record(pid, seconds, path) for pid, path in stacks.items()]
        cpu = {p.pid: p.cpu_times() for p in procs}
        result["load"] = wrk(f"{url}/classify", bodies[2_000:], connections, seconds, Path(tmp))
        for p in procs:
            t = p.cpu_times()
            result["processes"][str(p.pid)] = {"cores": round((t.user + t.system - sum(cpu[p.pid][:2])) / seconds, 2)}
        for spy in spies:
            if spy.wait(seconds + 30) != 0:
                raise RuntimeError(f"py-spy failed: {spy.stderr.read().decode() if spy.stderr else ''}")
    total: collections.Counter[str] = collections.Counter()
    for pid, path in stacks.items():
        text = path.read_text()
        total.update(_lines(text))
        result["processes"][str(pid)] |= summarise(text)
    result |= summarise("\n".join(f"{s} {n}" for s, n in total.items()))
    out.write_text(json.dumps(result, indent=1))
    return result


def _lines(collapsed: str) -> collections.Counter[str]:
    c: collections.Counter[str] = collections.Counter()
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if n.isdigit():
            c[stack] += int(n)
    return c


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts/demo"))
    ap.add_argument("--json", type=Path, default=Path("results/profile.json"))
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--hits", action="store_true", help="the same image every time: the cache-hit path")
    a = ap.parse_args()
    r = main(a.artifacts, a.json, a.seconds, a.connections, a.hits)
    print(f"{r['load']['req_per_s']:.0f} req/s at {a.connections} connections; busy samples by part (%):")
    for part, pct in r["parts_pct"].items():
        print(f"  {pct:5.1f}  {part}")
    print("top leaf functions (%):")
    for f, pct in r["top_leaves_pct"].items():
        print(f"  {pct:5.1f}  {f}")
    print("server cores:", {pid: p["cores"] for pid, p in r["processes"].items()})
