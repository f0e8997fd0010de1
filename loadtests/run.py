"""Headless locust against the service with Redis, checked against the service's own Prometheus counters.

    python -m loadtests.run --users 16 --duration 60          # make load
    python -m loadtests.run --users 8 --duration 20 --quick   # CI: a quick artifact directory, a short run

Starts the service (REDIS_URL set), runs locust for a bounded time, scrapes /metrics during the run, then
checks that the requests locust made are the requests the server counted, and writes CSV stats and
results/load/summary.json (users, req/s, p50/p95/p99, failures, cache hit ratio, CPU locust used).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from loadtests.server import ROOT, scrape, serving


def delta(after: dict[str, float], before: dict[str, float], prefix: str) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if k.startswith(prefix)}


def forget_cached(artifacts: Path, redis_url: str) -> None:
    """Start from a cold cache: drop this memory version's neighbour entries left by earlier runs."""
    import redis

    from service.artifacts import read_manifest

    version = read_manifest(artifacts).memory_version
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"rac:nb:{version}:*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i : i + 1000])


def run_locust(url: str, users: int, duration: int, out: Path) -> tuple[float, float]:
    """Runs locust headless; returns (CPU seconds locust used, wall seconds)."""
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(ROOT / "loadtests" / "locustfile.py"),
        "--headless",
        "--users",
        str(users),
        "--spawn-rate",
        str(users),
        "--run-time",
        f"{duration}s",
        "--host",
        url,
        "--json-file",
        str(out / "locust"),
        "--stop-timeout",
        "30",
        "--only-summary",
        "--exit-code-on-error",
        "0",
        "--loglevel",
        "WARNING",
    ]
    t = time.monotonic()
    proc = psutil.Popen(cmd, cwd=ROOT)
    cpu = 0.0
    while proc.poll() is None:  # sample until it exits: cpu_times of a finished process are gone
        times = proc.cpu_times()
        cpu = times.user + times.system
        time.sleep(0.2)
    if proc.returncode != 0:
        raise RuntimeError(f"locust exited with {proc.returncode}")
    return cpu, time.monotonic() - t


def endpoint_stats(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Locust's final per-endpoint stats (its JSON file) -> rows with percentiles, plus an aggregate row.
    (Its CSV is written on a timer and can miss the last second of a run; the JSON is final.)"""

    def row(name: str, group: list[dict[str, Any]]) -> dict[str, Any]:
        times: dict[float, int] = {}
        for e in group:
            for ms, n in e["response_times"].items():
                times[float(ms)] = times.get(float(ms), 0) + n
        ms = np.repeat(list(times), list(times.values())) if times else np.zeros(1)
        requests = sum(e["num_requests"] for e in group)
        span = max(e["last_request_timestamp"] for e in group) - min(e["start_time"] for e in group)
        return {
            "name": name,
            "requests": requests,
            "failures": sum(e["num_failures"] for e in group),
            "req_per_s": requests / max(span, 1e-9),
            **{f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)},
        }

    return [row(e["name"], [e]) for e in entries] + [row("Aggregated", entries)]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=Path("artifacts/demo"))
    p.add_argument("--quick", action="store_true", help="serve a quick artifact directory built into a temp dir")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--duration", type=int, default=60, help="seconds")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--out", type=Path, default=Path("results/load"))
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = a.artifacts
        if a.quick:
            artifacts = Path(tmp) / "artifacts"
            build = [sys.executable, "-m", "rac.cli", "build", "--quick", "--out", str(artifacts)]
            subprocess.run(build, check=True, cwd=ROOT, env=os.environ | {"TQDM_DISABLE": "1"})
        forget_cached(artifacts, a.redis)
        samples: list[dict[str, Any]] = []
        stop = threading.Event()

        def watch() -> None:  # the counters during the run, as Prometheus would see them
            while not stop.wait(2.0):
                samples.append({"t": time.time(), **delta(scrape(url, settle=False), before, "rac_")})

        with serving(artifacts, REDIS_URL=a.redis) as url:
            before = scrape(url)
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            cpu, wall = run_locust(url, a.users, a.duration, a.out)
            stop.set()
            watcher.join()
            after = scrape(url)
    stats = endpoint_stats(json.loads((a.out / "locust.json").read_text()))
    write_csv(stats, a.out / "stats.csv")
    summary = summarise(a, stats, after, before, cpu, wall, samples)
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=1))
    if summary["problems"]:
        raise SystemExit("load run FAILED: " + "; ".join(summary["problems"]))
    print(f"load run passed; wrote {a.out}/stats.csv and {a.out}/summary.json")


def summarise(
    a: argparse.Namespace,
    stats: list[dict[str, Any]],
    after: dict[str, float],
    before: dict[str, float],
    cpu: float,
    wall: float,
    samples: list[dict[str, Any]],
) -> dict[str, Any]:
    total = next(r for r in stats if r["name"] == "Aggregated")
    sent = total["requests"]
    counted = delta(after, before, "rac_requests_total")
    routes = ('route="/classify', 'route="/v2/models/{model_name}/infer"')  # what the two kinds of user call
    served = {k: v for k, v in counted.items() if any(r in k for r in routes)}
    classify = sum(served.values())
    refused = sum(v for k, v in served.items() if 'status="503"' in k)
    lookups = delta(after, before, "rac_cache_total")
    cache = {r: lookups.get(f'rac_cache_total{{result="{r}"}}', 0.0) for r in ("hit", "miss", "error")}
    failures = total["failures"]
    problems = []
    # --stop-timeout lets every request in flight finish, so the two counts must agree exactly.
    if classify != sent:
        problems.append(f"locust sent {sent} requests, the server counted {classify:.0f}")
    if failures:
        problems.append(f"{failures} failed requests")
    if len(samples) < 2:
        problems.append("/metrics was not scraped during the run")
    return {
        "users": a.users,
        "seconds": a.duration,
        "requests": sent,
        "req_per_s": total["req_per_s"],
        "p50_ms": total["p50_ms"],
        "p95_ms": total["p95_ms"],
        "p99_ms": total["p99_ms"],
        "failures": failures,
        "refused_503": refused,
        "server_counted": classify,
        "cache": cache,
        "cache_hit_ratio": cache["hit"] / max(1.0, cache["hit"] + cache["miss"]),
        "locust_cpu_cores": cpu / wall,
        "by_name": {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in stats},
        "problems": problems,
        "samples": samples,
    }


if __name__ == "__main__":
    main()
