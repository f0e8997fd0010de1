"""The Python opcodes a server process's event loop runs for one request: a count, not a time, so that a
change to the request path's Python can be compared where a shared host's speed moves by more than the change
between two timed runs.

    python -m loadtests.opcodes --artifacts artifacts/demo --json results/opcodes.json
    python -m loadtests.opcodes --artifacts artifacts/demo --checkout before=/tmp/old --checkout after=. \
        --json results/opcodes_ab.json
    python -m loadtests.opcodes --artifacts artifacts/demo --protocol v2-grpc --json results/opcodes_grpc.json

Each checkout is served in one process (`python -m service`'s uvicorn configuration and protocol, its settings
from RAC_* as usual, one process) with its event loop traced (sys.settrace, opcode events) while the bench's
driver sends one new image a request: wrk for /classify (`--protocol classify`, multipart) and the Open
Inference Protocol's REST route (`v2-http`), the native gRPC driver for its ModelInfer (`v2-grpc`). The
warm-up's images are not sent again: every traced request is a cache miss. The count is divided by the
requests the driver had answered meanwhile. Not counted: C code (uvloop, httptools, orjson, protobuf, hashing,
numpy), the batches (their thread is not traced) and the kernel. Traced, a request takes many times as long as
it does untraced: the count is the figure, never the time."""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOP = 40  # functions listed by name in the results
# Images the warm-up sends (3 s), apart from the traced run's: an image the server has answered is a cache hit,
# a shorter path than a new image's. Untraced, one process answers about 600 a second at 8 connections.
WARM_IMAGES = 5_000
PROTOCOLS = ("classify", "v2-http", "v2-grpc")  # /classify (multipart), the Open Inference Protocol's REST and gRPC


def _where(path: str) -> str:
    """A code object's file as the results name it: within site-packages, the standard library or the checkout."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    stdlib = sysconfig.get_paths()["stdlib"]
    if path.startswith(stdlib):
        return "python/" + os.path.relpath(path, stdlib)
    return os.path.relpath(path) if os.path.isabs(path) else path


def serve(artifacts: Path, port: int, out: Path) -> None:
    """The server process: traced from SIGUSR1 to SIGUSR2, the counts then written to `out` (JSON)."""
    import asyncio

    import uvicorn
    from uvicorn._compat import asyncio_run

    from service.serve import AppFactory, _config
    from service.settings import Settings

    config = _config(AppFactory(Settings(artifacts=artifacts, host="127.0.0.1", port=port)), 1)
    server = uvicorn.Server(config)
    counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def tracer(frame: Any, event: str, arg: object) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            counts[code.co_filename, code.co_name] += 1
        return tracer

    def stop() -> None:
        sys.settrace(None)
        by_function = {f"{_where(f)}:{name}": n for (f, name), n in counts.items()}
        written = out.with_suffix(".part")
        written.write_text(json.dumps(by_function))
        written.replace(out)  # whole or not there: the caller waits for it

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, sys.settrace, tracer)  # the loop's thread: where it traces
        loop.add_signal_handler(signal.SIGUSR2, stop)
        await server.serve()

    asyncio_run(main(), loop_factory=config.get_loop_factory())  # the loop uvicorn runs on: uvloop where installed


def measure(
    name: str, checkout: Path, artifacts: Path, protocol: str, images: list[bytes], connections: int, seconds: float
) -> dict[str, Any]:
    import httpx

    from loadtests.server import free_port, wait_ready

    port, grpc_port, tmp = free_port(), free_port() if protocol == "v2-grpc" else 0, Path(tempfile.mkdtemp())
    counts = tmp / "counts.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RAC_HOST", "RAC_PORT", "RAC_WORKERS", "REDIS_URL")}
    env |= {"PYTHONPATH": str(checkout.resolve()), "RAC_GRPC_PORT": str(grpc_port)}
    cmd = [sys.executable, __file__, "--serve", str(artifacts.resolve()), str(port), str(counts)]
    url = f"http://127.0.0.1:{port}"
    warm, traced = images[:WARM_IMAGES], images[WARM_IMAGES:]  # the traced run's images are all new to the server
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a pipe left unread would fill and stall it
        proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            wait_ready(proc, log, url, lambda: httpx.get(f"{url}/readyz").status_code == 200)
            print(f"{name}: warming up ...", flush=True)
            drive(protocol, url, grpc_port, warm, connections, 3, tmp)
            proc.send_signal(signal.SIGUSR1)
            print(f"{name}: traced, {seconds:g} s ...", flush=True)
            requests = drive(protocol, url, grpc_port, traced, connections, seconds, tmp)
            proc.send_signal(signal.SIGUSR2)
            while not counts.exists():
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"{name}: the server exited before writing its counts:\n{log.read()}")
                time.sleep(0.1)
            by_function: dict[str, int] = json.loads(counts.read_text())
        finally:
            proc.kill()  # a throwaway process: nothing of it needs a graceful stop
            proc.wait(30)
    by_file: collections.Counter[str] = collections.Counter()
    for key, n in by_function.items():
        by_file[key.rsplit(":", 1)[0]] += n
    total = sum(by_function.values())
    return {
        "directory": str(checkout),
        "requests": requests,
        "opcodes_per_request": total / requests,
        "by_file": {k: v / requests for k, v in by_file.most_common()},
        "by_function": {k: v / requests for k, v in collections.Counter(by_function).most_common(TOP)},
    }


def drive(
    protocol: str, url: str, grpc_port: int, images: list[bytes], connections: int, seconds: float, tmp: Path
) -> int:
    """One image a request, each a new one, sent as the bench sends them: the requests answered."""
    from loadtests import drivers, multipart

    if protocol == "classify":
        bodies = [multipart.encode([("image", png)]) for png in images]
        stats = drivers.wrk(f"{url}/classify", bodies, connections, seconds, tmp)
    elif protocol == "v2-http":
        stats = drivers.v2_http(url, images, connections, seconds, tmp)
    else:
        stats = drivers.v2_grpc(f"127.0.0.1:{grpc_port}", images, connections, seconds, tmp)
    return int(stats["requests"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=Path("artifacts/demo"))
    p.add_argument("--checkout", action="append", help="NAME=DIR: a checkout to serve (default: this one)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="classify")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--json", type=Path, default=Path("results/opcodes.json"))
    p.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)  # ARTIFACTS PORT OUT: the traced server process
    args = p.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), int(args.serve[1]), Path(args.serve[2]))
        return
    import itertools

    from loadtests.images import pngs

    checkouts = [c.split("=", 1) for c in args.checkout or [f"this={ROOT}"]]
    images = list(itertools.islice(pngs(), WARM_IMAGES + 20_000))
    results: dict[str, Any] = {
        "command": "python -m loadtests.opcodes " + " ".join(sys.argv[1:]),
        "protocol": args.protocol,
        "connections": args.connections,
        "seconds": args.seconds,
        "checkouts": {},
    }
    for name, directory in checkouts:
        r = results["checkouts"][name] = measure(
            name, Path(directory), args.artifacts, args.protocol, images, args.connections, args.seconds
        )
        print(f"{name}: {r['opcodes_per_request']:.0f} opcodes a request over {r['requests']} requests")
        for key, n in list(r["by_file"].items())[:12]:
            print(f"  {n:8.1f}  {key}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
