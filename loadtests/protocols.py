"""The front-ends side by side: v2 REST and gRPC throughput (and `POST /classify` with --classify), back to back.

    python -m loadtests.protocols --artifacts artifacts/demo --grpc-processes 1,4 --repeat 2 \\
        --json results/protocols.json
    python -m loadtests.protocols --artifacts artifacts/demo --checkout before=/tmp/old --checkout after=. \\
        --repeat 2 --json /tmp/protocols_ab.json
    python -m loadtests.protocols --classify --grpc-processes '' --checkout before=/tmp/old --checkout after=. \
        --repeat 3 --json results/classify_ab.json

The v2 part of `rac bench` alone (loadtests/drivers.py: wrk with prepared binary-tensor bodies for REST, the
native driver or loadtests/v2load.py processes for gRPC, every request a new image), without the ceiling, encoder,
/classify and overload runs that make the whole bench long, with what each request cost: the server's CPU
(all its processes), the load generator's, and the mean batch the server ran. `--grpc-processes` gives the
gRPC drivers to measure, each right after REST: 0 the native one, N the Python one in N processes. Each
`--checkout NAME=DIR` is served in turn (`python -m service` from DIR, on the same artifacts and settings) and
measured at each concurrency, REST then
gRPC; `--repeat` runs the whole round again, so that two versions of the server are compared on the same
machine state, interleaved. On a shared host the figures move between rounds: compare within a round.
`--hits` also sends one image over and over to /classify: every request a cache hit, the request path without
the model (python -m loadtests.protocols --hits --grpc-processes '' --checkout before=/tmp/old --checkout after=.).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from loadtests import multipart
from loadtests.drivers import measured, server_tree, v2_grpc, v2_http, wrk
from loadtests.images import pngs
from loadtests.server import ROOT, free_port, serving

SHARE = 1_500  # distinct images per second of measurement and API: every request a cache miss


def run(
    artifacts: Path,
    checkouts: dict[str, Path],
    levels: list[int],
    seconds: float,
    repeat: int,
    drivers: list[int],
    classify: bool = False,
    hits: bool = False,
) -> dict[str, Any]:
    share = max(2_000, round(SHARE * seconds))
    images = iter(pngs())
    overrides = {k: v for k, v in os.environ.items() if k.startswith("RAC_") and k not in ("RAC_GRPC_PORT",)}
    rounds: list[dict[str, Any]] = []
    for n in range(repeat):
        this: dict[str, Any] = {}
        for name, root in checkouts.items():
            port = free_port()
            served = serving(artifacts, root, RAC_GRPC_PORT=str(port), **overrides)
            with served as url, tempfile.TemporaryDirectory() as t:
                runs: dict[str, Any] = {"v2_http": {}} | {f"v2_grpc_p{p}": {} for p in drivers}
                runs["grpc_over_http"] = {}
                processes = server_tree(url)
                for c in levels:
                    print(f"round {n + 1}, {name}, {c} connections ...", flush=True)
                    if hits:  # one image over and over: cache hits, the request path without the model
                        bodies = [multipart.encode([("image", next(iter(pngs())))])]
                        drive = functools.partial(wrk, f"{url}/classify", bodies, c, seconds, Path(t))
                        runs.setdefault("classify_hits", {})[str(c)] = measured(url, processes, drive)
                    if classify:  # multipart, as /classify's clients send it, by wrk
                        bodies = [multipart.encode([("image", b)]) for b in itertools.islice(images, share)]
                        drive = functools.partial(wrk, f"{url}/classify", bodies, c, seconds, Path(t))
                        runs.setdefault("classify", {})[str(c)] = measured(url, processes, drive)
                    rest = list(itertools.islice(images, share))
                    drive = functools.partial(v2_http, url, rest, c, seconds, Path(t))
                    runs["v2_http"][str(c)] = measured(url, processes, drive)
                    runs["grpc_over_http"][str(c)] = {}
                    for p in drivers:
                        grpc = list(itertools.islice(images, share))
                        drive = functools.partial(v2_grpc, f"127.0.0.1:{port}", grpc, c, seconds, Path(t), p)
                        runs[f"v2_grpc_p{p}"][str(c)] = stats = measured(url, processes, drive)
                        runs["grpc_over_http"][str(c)][f"p{p}"] = (
                            stats["req_per_s"] / runs["v2_http"][str(c)]["req_per_s"]
                        )
                this[name] = runs
        rounds.append(this)
    return {
        "command": "python -m loadtests.protocols",
        "machine": {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()},
        "settings": {"seconds": seconds, "concurrency": levels, **overrides},
        "checkouts": {name: str(root) for name, root in checkouts.items()},
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=Path("artifacts/demo"))
    p.add_argument("--checkout", action="append", default=[], help="NAME=DIR: a checkout to serve (default: this one)")
    p.add_argument("--concurrency", default="16", help="comma-separated")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument(
        "--grpc-processes",
        default="0,1",
        help="comma-separated gRPC drivers: 0 the native one (make grpc-load), N loadtests/v2load.py in N processes",
    )
    p.add_argument("--classify", action="store_true", help="also POST /classify, first at each concurrency")
    p.add_argument("--hits", action="store_true", help="also POST /classify with one image (cache hits), first")
    p.add_argument("--json", type=Path, default=Path("results/protocols.json"))
    a = p.parse_args(argv)
    checkouts = {name: Path(d).resolve() for name, d in (c.split("=", 1) for c in a.checkout)} or {"this": ROOT}
    levels = [int(c) for c in a.concurrency.split(",")]
    drivers = [int(p) for p in a.grpc_processes.split(",") if p]
    results = run(a.artifacts.resolve(), checkouts, levels, a.seconds, a.repeat, drivers, a.classify, a.hits)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(results, indent=1))
    for n, r in enumerate(results["rounds"], 1):
        for name, runs in r.items():
            for c, ratios in runs["grpc_over_http"].items():
                line = f"round {n} {name} c={c}:"
                for api in [k for k in runs if k.startswith(("v2_", "classify"))]:
                    r = runs[api][c]
                    line += f"  {api} {r['req_per_s']:6.1f} req/s, server {r['server_cpu_ms_per_request']:.2f} ms"
                    line += (
                        f" client {r['client_cpu_ms_per_request']:.2f} ms CPU/req, batch {r['mean_batch'] or 0:.1f};"
                    )
                print(f"{line} gRPC/REST {', '.join(f'{k} {v:.3f}' for k, v in ratios.items())}")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
