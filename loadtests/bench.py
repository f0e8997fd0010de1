"""`rac bench`: what serving costs on top of the model, measured in one run on one machine.

    rac bench --artifacts artifacts/demo --seconds 6 --json results/bench.json

1. in-process ceiling: decode + encode + search + head over distinct images, in batches of max_batch, no HTTP,
   in the server's own layout (its processes and encoder threads per process: loadtests/ceiling.py), and
   the older one-process figure beside it
2. the raw encoder alone in onnxruntime, batch 1 to 64
3. HTTP throughput and p50/p99 latency at several concurrencies, every request a new image (cache misses),
   driven by wrk (one thread, a Lua script cycling through prepared multipart bodies), with the CPU wrk used,
   the server's CPU per request (read from its processes) and the mean batch the server formed
4. the same for the Open Inference Protocol, at each concurrency right after /classify: v2 REST driven by wrk
   with prepared binary-tensor bodies (as tritonclient.http sends them), and gRPC by the native driver
   (loadtests/grpc_load.cc, `make grpc-load`: one thread, one connection per caller, prepared requests); at the
   top concurrency, PROTOCOL_ROUNDS pairs of the two (REST first, then gRPC first, in turn): `v2_grpc_rounds` has
   each pair's gRPC/REST ratio, and the figures at that concurrency are the median pair's
5. raw image bodies (Content-Type: image/png) beside multipart at the top concurrency
6. cache-hit latency: one image, over and over, one connection
7. /classify by wrk at the lowest overload level's connections (64), as at the levels above, CPU_ROUNDS times:
   where the request path's CPU is read (below)
8. overload: 64 to 1024 connections of distinct images (loadtests/overload.py): successful and refused
   requests per second, latency of each kind apart, /readyz latency meanwhile, every other answer by status,
   the server's CPU per successful request
9. the ceiling again at the batch sizes the server formed at the top concurrency and at 64 connections, each
   right after the run it is for while the server idles (a shared machine's speed drifts over minutes: what
   is subtracted is measured within seconds), so that the loss to smaller batches is told apart from the loss
   to the request path: `server_cpu_ms_per_request` is the server's CPU per successful request at 64
   connections minus the pipeline's CPU per image at the batch size the server formed there;
   `server_cpu_split` splits the server's CPU at that level by thread instead, within the one run: the
   batches' worker threads (rac_batch_cpu_seconds) and the rest, the request path's own. Each round is a
   run and its ceiling; the figure is the median round's (`server_cpu_rounds` has every round's), and
   `http/64` and its ceiling are that round's. It is read from wrk's runs, not the overload driver's: on two
   cores the generator's work competes with the server's, and the driver's Python takes about three times
   the CPU wrk does there (`client_cores`)

Every goal of the serving path is in "targets", with its value and whether it is met. The machine may be
shared: its load averages at the start and the end are in "machine"; compare ratios, which come from one run.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from loadtests import ceiling, multipart
from loadtests.drivers import measured, overload, server_tree, v2_grpc, v2_http, wrk
from loadtests.images import pngs
from loadtests.server import free_port, scrape, serving
from service.artifacts import ENCODER, read_manifest
from service.settings import Settings

# key -> (goal, whether a value at most the goal meets it); the keys are paths into the results
GOALS = {
    "ratios.overload_ok_c1024_over_c64": (0.8, False),
    "overload.1024.readyz_p99_ms": (100.0, True),
    "ratios.v2_grpc_c16_over_v2_http": (0.95, False),
    "server_cpu_ms_per_request": (0.25, True),
    "cache_hit.p50_ms": (0.5, True),
}
# Images of each ceiling at a formed batch: 16,384 are about five seconds of work per process. The ceiling's CPU
# an image, and server_cpu_ms_per_request with it, moved by a tenth between runs of 2,048 images, by 0.05 between
# back-to-back runs of 8,192 and by 0.03 between runs of 16,384.
FORMED_IMAGES = 16384
# Rounds of (a run at 64 connections, its ceiling) that server_cpu_ms_per_request is the median of: between two
# runs of the same code on this shared host the figure moved by up to 0.07 ms.
CPU_ROUNDS = 3
# Pairs of (v2 REST, v2 gRPC) runs at the top concurrency that ratios.v2_grpc_c16_over_v2_http is the median of:
# between pairs of runs of the same code the ratio moved from 0.86 to 1.04 (results/protocols_lean_ab.json), by
# more than the goal's margin, and the median of three pairs landed on either side of the goal from one bench to
# the next. Seven pairs cost the bench about a minute and a half more than three.
PROTOCOL_ROUNDS = 7
Round = tuple[dict[str, Any], dict[str, Any]]  # a run and the ceiling at the batch it formed


def raw_encoder(settings: Settings, seconds: float = 2.0) -> dict[str, float]:
    from service.core.encode import Encoder

    manifest = read_manifest(settings.artifacts)
    size = int(manifest.encoder.input["size"])
    encoder = Encoder(settings.artifacts / ENCODER, settings.device, settings.encoder_threads, settings.encoder_spin)
    out = {}
    for b in (1, 2, 4, 8, 16, 32, 64):
        x = np.random.default_rng(0).standard_normal((b, 3, size, size)).astype(np.float32)
        encoder.both(x)  # both outputs of a fine-tuned build's graph, as the service runs it
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            encoder.both(x)
            n += b
        out[str(b)] = n / (time.perf_counter() - t)
    return out


def formed_ceiling(settings: Settings, images: list[bytes], mean_batch: float | None) -> dict[str, Any]:
    """The served-layout ceiling at the batch size the server formed (rounded), with its CPU per image."""
    batch = max(1, round(mean_batch or settings.max_batch))
    run = ceiling.served_layout(settings.model_copy(update={"max_batch": batch}), images)
    run["cpu_ms_per_image"] = 1000 * run["cores_busy"] / run["img_per_s"]
    return run


def main(artifacts: Path, out: Path, seconds: float, concurrency: str, flood: str = "64,256,1024") -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk (or `make bench`)")
    levels = [int(c) for c in concurrency.split(",")]
    floods = [int(c) for c in flood.split(",") if c]
    top = str(max(levels))
    low = str(min(floods)) if floods else None  # the connections server_cpu_ms_per_request is read at
    settings = Settings(artifacts=artifacts)  # the caller's RAC_* settings, as the served process gets them
    print("preparing images ...", flush=True)
    # Enough distinct images that no measurement runs out (and repeats, hitting the cache) below 1,500 req/s.
    share = max(2_000, round(1_500 * seconds))
    apis = ("http", "v2_http", "v2_grpc")  # /classify and the Open Inference Protocol over REST and gRPC
    runs = len(levels) * len(apis) + 2 * (PROTOCOL_ROUNDS - 1) + 1 + CPU_ROUNDS  # each with its own new images
    flooded = 4096 + share * runs  # where the overload runs' images start
    images = list(itertools.islice(pngs(), flooded + 40_000 * len(floods)))
    results: dict[str, Any] = {
        "command": f"rac bench --artifacts {artifacts} --seconds {seconds:g}",
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "load_avg_start": os.getloadavg(),
        },
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
    with serving(artifacts, RAC_GRPC_PORT=str(grpc_port), **overrides) as url, tempfile.TemporaryDirectory() as t:
        tmp, processes = Path(t), server_tree(url)
        fresh = iter(images[4096:])  # the images the in-process run used are never sent: every request a miss

        def run(name: str, drive: Any) -> dict[str, Any]:
            print(f"{name} ...", flush=True)
            return measured(url, processes, drive)

        def at_formed_batch(name: str, mean_batch: float | None) -> None:
            """The ceiling at the batch the server formed in run `name`, measured now, the server idle."""
            print(f"in-process ceiling at the batch formed in {name} ({mean_batch or 0:.1f}) ...", flush=True)
            formed = formed_ceiling(settings, images[:FORMED_IMAGES], mean_batch)
            results["ceiling"].setdefault("at_formed_batch", {})[name] = formed

        for api in (*apis, "raw"):
            results[api] = {}

        def protocols(c: int, label: str = "", grpc_first: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
            """v2 REST and v2 gRPC at c connections, one after the other: (REST, gRPC)."""
            rest = functools.partial(v2_http, url, list(itertools.islice(fresh, share)), c, seconds, tmp)
            target = f"127.0.0.1:{grpc_port}"
            grpc = functools.partial(v2_grpc, target, list(itertools.islice(fresh, share)), c, seconds, tmp)
            order = [("gRPC", grpc), ("REST", rest)] if grpc_first else [("REST", rest), ("gRPC", grpc)]
            done = {name: run(f"v2 {name}, {c} connections{label}", drive) for name, drive in order}
            return done["REST"], done["gRPC"]

        pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (v2 REST, v2 gRPC) at the top concurrency
        for c in levels:  # the three APIs back to back at each concurrency, each with its own new images
            bodies = [multipart.encode([("image", p)]) for p in itertools.islice(fresh, share)]
            drive = functools.partial(wrk, f"{url}/classify", bodies, c, seconds, tmp)
            results["http"][str(c)] = run(f"http, {c} connections", drive)
            if str(c) == top:
                at_formed_batch(f"http_c{top}", results["http"][top]["mean_batch"])
                # in turn REST first and gRPC first: the host's drift within a pair favours neither
                for i in range(PROTOCOL_ROUNDS):
                    pairs.append(protocols(c, f", round {i + 1} of {PROTOCOL_ROUNDS}", grpc_first=i % 2 == 1))
            else:
                results["v2_http"][str(c)], results["v2_grpc"][str(c)] = protocols(c)
        grpc_ratios = [grpc["req_per_s"] / rest["req_per_s"] for rest, grpc in pairs]
        median_pair = sorted(range(len(pairs)), key=grpc_ratios.__getitem__)[len(pairs) // 2]
        results["v2_http"][top], results["v2_grpc"][top] = pairs[median_pair]
        results["v2_grpc_rounds"] = grpc_ratios
        raw = list(itertools.islice(fresh, share))  # raw image/png bodies: what `curl --data-binary` sends
        drive = functools.partial(wrk, f"{url}/classify", raw, int(top), seconds, tmp, "image/png")
        results["raw"][top] = run(f"raw image bodies, {top} connections", drive)
        hit = [multipart.encode([("image", images[0])])]
        drive = functools.partial(wrk, f"{url}/classify", hit, 1, min(seconds, 5.0), tmp)
        results["cache_hit"] = run("cache hits", drive)
        rounds: list[Round] = []  # where the request path's CPU is read (the docstring's 7 and 9)
        for i in range(CPU_ROUNDS):
            if low is None:
                break
            bodies = [multipart.encode([("image", p)]) for p in itertools.islice(fresh, share)]
            drive = functools.partial(wrk, f"{url}/classify", bodies, int(low), seconds, tmp)
            stats = run(f"http, {low} connections, round {i + 1} of {CPU_ROUNDS}", drive)
            at_formed_batch(f"http_c{low}", stats["mean_batch"])
            rounds.append((stats, results["ceiling"]["at_formed_batch"][f"http_c{low}"]))
        results["server_cache"] = {
            key.split("{")[1].rstrip("}"): v for key, v in scrape(url).items() if key.startswith("rac_cache_total{")
        }
        results["overload"] = {}
        for i, c in enumerate(floods):
            start = flooded + 40_000 * i
            bodies = [multipart.encode([("image", p)]) for p in images[start : start + 40_000]]
            drive = functools.partial(overload, url, bodies, c, seconds, tmp)
            results["overload"][str(c)] = run(f"overload, {c} connections", drive)
    results["machine"]["load_avg_end"] = os.getloadavg()
    results["ratios"] = ratios(results, top, floods)
    if rounds and low is not None:
        median = request_path(results, rounds, int(low))
        results["http"][low], results["ceiling"]["at_formed_batch"][f"http_c{low}"] = rounds[median]
    results["targets"] = targets(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"\nwrote {out}")


def request_path(results: dict[str, Any], rounds: list[Round], connections: int) -> int:
    """server_cpu_ms_per_request from rounds of (a run, the ceiling at the batch it formed): the median round's,
    every round's beside it, and the median round's CPU split by thread (the request path's own, and what the
    batches cost an image there against the ceiling's). Returns the median round."""
    figures = [run["server_cpu_ms_per_request"] - ceiling["cpu_ms_per_image"] for run, ceiling in rounds]
    median = sorted(range(len(rounds)), key=figures.__getitem__)[len(rounds) // 2]
    run, ceiling = rounds[median]
    results["server_cpu_ms_per_request"] = figures[median]
    results["server_cpu_rounds"] = figures
    results["server_cpu_split"] = {
        "connections": connections,
        "outside_batches_ms_per_request": run["outside_batches_cpu_ms_per_request"],
        "event_loop_ms_per_request": run["event_loop_cpu_ms_per_request"],
        "batch_ms_per_image": run["batch_cpu_ms_per_image"],
        "ceiling_ms_per_image": ceiling["cpu_ms_per_image"],
    }
    return median


def ratios(r: dict[str, Any], top: str, floods: list[int]) -> dict[str, float]:
    served = r["ceiling"]["served_layout"]["img_per_s"]
    at_batch = r["ceiling"]["at_formed_batch"][f"http_c{top}"]["img_per_s"]
    http, v2, grpc = r["http"][top], r["v2_http"][top], r["v2_grpc"][top]
    out = {
        f"http_c{top}_over_served_ceiling": http["req_per_s"] / served,
        # the same ceiling, at the batch size the server formed: what the request path alone loses
        f"http_c{top}_over_ceiling_at_formed_batch": http["req_per_s"] / at_batch,
        f"http_c{top}_over_single_process_ceiling": http["req_per_s"] / r["ceiling"]["single_process"]["img_per_s"],
        f"http_c{top}_p99_over_p50": http["p99_ms"] / http["p50_ms"],
        "served_ceiling_over_encoder_b32": served / r["encoder"]["32"],
        f"v2_http_c{top}_over_http": v2["req_per_s"] / http["req_per_s"],
        f"v2_grpc_c{top}_over_v2_http": grpc["req_per_s"] / v2["req_per_s"],
        f"raw_c{top}_over_multipart_c{top}": r["raw"][top]["req_per_s"] / http["req_per_s"],
    }
    if len(floods) > 1:
        low, high = r["overload"][str(min(floods))], r["overload"][str(max(floods))]
        out[f"overload_ok_c{max(floods)}_over_c{min(floods)}"] = high["ok_per_s"] / low["ok_per_s"]
    return out


def targets(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each goal of the serving path: its value in this run, the goal, and whether it is met."""
    out = {}
    for key, (goal, at_most) in GOALS.items():
        value: Any = r
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) and part in value else None
            if value is None:
                break
        met = None if value is None else (value <= goal if at_most else value >= goal)
        out[key] = {"value": value, "goal": f"{'at most' if at_most else 'at least'} {goal:g}", "met": met}
    return out


def table(r: dict[str, Any]) -> str:
    served, single = r["ceiling"]["served_layout"], r["ceiling"]["single_process"]
    lines = [
        f"in-process ceiling (decode+encode+search+head, batch {served['batch']}), served layout "
        f"({served['processes']} processes x {served['encoder_threads']} encoder threads): "
        f"{served['img_per_s']:.0f} img/s, {served['cores_busy']:.2f} cores busy; "
        f"one process: {single['img_per_s']:.0f} img/s, {single['cores_busy']:.2f} cores busy",
        "at the batch the server formed: "
        + "; ".join(
            f"{name}: batch {c['batch']}, {c['img_per_s']:.0f} img/s, {c['cpu_ms_per_image']:.2f} ms CPU/image"
            for name, c in r["ceiling"]["at_formed_batch"].items()
        ),
        "raw encoder: " + ", ".join(f"b{b} {v:.0f}" for b, v in r["encoder"].items()) + " img/s",
        f"load average: {r['machine']['load_avg_start'][0]:.2f} at the start, {r['machine']['load_avg_end'][0]:.2f} "
        "at the end",
        "",
        "| API | concurrency | req/s | p50 ms | p99 ms | errors | mean batch | server CPU ms/req | client cores |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = {"http": "POST /classify", "v2_http": "v2 REST (binary)", "v2_grpc": "v2 gRPC", "raw": "raw image/png"}
    for c in r["http"]:
        for api, name in names.items():
            if c in r[api]:
                lines.append(_row(name, c, r[api][c]))
    lines.append(_row("cache hit", "1", r["cache_hit"]))
    if r.get("overload"):
        lines += [
            "",
            "| connections | ok/s | refused/s | ok p50 ms | ok p99 ms | refused p99 ms | /readyz p99 ms "
            "| other answers | server CPU ms/ok | server RSS MB | generator cores |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c, o in r["overload"].items():
            lines.append(
                f"| {c} | {o['ok_per_s']:.0f} | {o['refused_per_s']:.0f} | {_ms(o['ok_p50_ms'])} "
                f"| {_ms(o['ok_p99_ms'])} | {_ms(o['refused_p99_ms'])} | {_ms(o['readyz_p99_ms'])} "
                f"| {o['errors'] or '-'} "
                f"| {o['server_cpu_ms_per_request']:.2f} | {o['server_rss_mb']:.0f} | {o['client_cores']:.2f} |"
            )
    lines += ["", "| goal | value | target | met |", "| --- | --- | --- | --- |"]
    for key, t in r["targets"].items():
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        lines.append(f"| {key} | {value} | {t['goal']} | {'yes' if t['met'] else 'no'} |")
    split = r.get("server_cpu_split")
    if split:
        lines.append(
            f"\nat {split['connections']} connections: {split['outside_batches_ms_per_request']:.3f} ms of server CPU "
            f"a request outside the batches ({split.get('event_loop_ms_per_request') or 0:.3f} in the event loops); "
            f"the batches {split['batch_ms_per_image']:.3f} ms an image "
            f"(the ceiling's {split['ceiling_ms_per_image']:.3f}); batches by size (at most): "
            f"{r['http'][str(split['connections'])].get('batch_sizes')}; server_cpu_ms_per_request by round: "
            + ", ".join(f"{x:.3f}" for x in r["server_cpu_rounds"])
        )
    top = max((c for c in r["http"] if c in r["v2_http"]), key=int)
    if r.get("v2_grpc_rounds"):
        lines.append(f"v2 gRPC / v2 REST at {top} by round: " + ", ".join(f"{x:.3f}" for x in r["v2_grpc_rounds"]))
    lines.append(
        f"connections per server process at {top}: "
        + "; ".join(f"{name} {r[api][top].get('connections_per_process')}" for api, name in names.items())
    )
    return "\n".join(lines)


def _row(name: str, c: str, s: dict[str, Any]) -> str:
    errors = s.get("non_2xx", 0) + s.get("socket_errors", 0) + s.get("non_ok", 0)
    return (
        f"| {name} | {c} | {s['req_per_s']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {errors} "
        f"| {s['mean_batch'] or 0:.1f} | {s['server_cpu_ms_per_request']:.2f} | {s['client_cores']:.2f} |"
    )


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


if __name__ == "__main__":  # python -m loadtests.bench results/bench.json: its tables again, as Markdown
    import sys

    print(table(json.loads(Path(sys.argv[1]).read_text())))
