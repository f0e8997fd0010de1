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
gRPC drivers to measure, each right after REST: 0 the native one, N the Python one in N processes; with
`--classify`, v2 REST's throughput over /classify's is kept beside gRPC's over REST's. Each
`--checkout NAME=DIR` is served in turn (`python -m service` from DIR, on the same artifacts and settings) and
measured at each concurrency, REST then gRPC; `NAME=DIR,RAC_X=V,...` serves it with settings of its own beside
the caller's (the same checkout twice: two settings compared); `--repeat` runs the whole round again, so that
two versions of the server are compared on the same machine state, interleaved. On a shared host the figures
move between rounds: compare within a round.
`--warm S` first drives S seconds of /classify with new images at the highest concurrency, unmeasured: a server
that has served a while, its caches full. `--hits` also sends one image over and over to /classify: every
request a cache hit, the request path without the model (python -m loadtests.protocols --hits
--grpc-processes '' --checkout before=/tmp/old --checkout after=.).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

from loadtests import multipart
from loadtests.drivers import measured, server_tree, v2_grpc, v2_http, wrk
from loadtests.images import pngs
from loadtests.server import ROOT, free_port, serving

SHARE = 1_500  # distinct images per second of measurement and API: every request a cache miss


class Checkout(NamedTuple):
    """A checkout to serve, and the RAC_* settings it is served with (beside the caller's own)."""

    root: Path
    settings: dict[str, str]


def run(
    artifacts: Path,
    checkouts: dict[str, Checkout],
    levels: list[int],
    seconds: float,
    repeat: int,
    drivers: list[int],
    classify: bool = False,
    hits: bool = False,
    warm: float = 0.0,
) -> dict[str, Any]:
    share = max(2_000, round(SHARE * seconds))
    images = iter(pngs())
    overrides = {k: v for k, v in os.environ.items() if k.startswith("RAC_") and k not in ("RAC_GRPC_PORT",)}
    rounds: list[dict[str, Any]] = []
    for n in range(repeat):
        this: dict[str, Any] = {}
        for name, (root, settings) in checkouts.items():
            port = free_port()
            served = serving(artifacts, root, RAC_GRPC_PORT=str(port), **(overrides | settings))
            with served as url, tempfile.TemporaryDirectory() as t:
                runs: dict[str, Any] = {"v2_http": {}} | {f"v2_grpc_p{p}": {} for p in drivers}
                runs["grpc_over_http"] = {}
                processes = server_tree(url)
                if warm:  # a server that has served a while: its caches full, its heap grown; not measured
                    print(f"round {n + 1}, {name}, warming up for {warm:g} s ...", flush=True)
                    bodies = [multipart.encode([("image", b)]) for b in itertools.islice(images, round(SHARE * warm))]
                    wrk(f"{url}/classify", bodies, max(levels), warm, Path(t))
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
                    if classify:
                        rate = runs["v2_http"][str(c)]["req_per_s"] / runs["classify"][str(c)]["req_per_s"]
                        runs.setdefault("rest_over_classify", {})[str(c)] = rate
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
        "settings": {"seconds": seconds, "concurrency": levels, "warm_s": warm, **overrides},
        "checkouts": {name: {"directory": str(c.root), "settings": c.settings} for name, c in checkouts.items()},
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=Path("artifacts/demo"))
    p.add_argument(
        "--checkout",
        action="append",
        default=[],
        help="NAME=DIR[,RAC_X=V...]: a checkout to serve, with settings of its own (default: this one)",
    )
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
    p.add_argument(
        "--warm", type=float, default=0.0, help="seconds of /classify with new images before measuring (not measured)"
    )
    p.add_argument("--json", type=Path, default=Path("results/protocols.json"))
    a = p.parse_args(argv)
    checkouts: dict[str, Checkout] = {}
    for spec in a.checkout:
        name, where = spec.split("=", 1)
        directory, *settings = where.split(",")
        checkouts[name] = Checkout(Path(directory).resolve(), dict(s.split("=", 1) for s in settings))
    checkouts = checkouts or {"this": Checkout(ROOT, {})}
    levels = [int(c) for c in a.concurrency.split(",")]
    drivers = [int(p) for p in a.grpc_processes.split(",") if p]
    results = run(a.artifacts.resolve(), checkouts, levels, a.seconds, a.repeat, drivers, a.classify, a.hits, a.warm)
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
                if "rest_over_classify" in runs:
                    line += f" v2 REST/classify {runs['rest_over_classify'][c]:.3f};"
                print(f"{line} gRPC/REST {', '.join(f'{k} {v:.3f}' for k, v in ratios.items())}")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
