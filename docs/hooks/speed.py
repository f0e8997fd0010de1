"""Renderers of the speed tables: rac bench, memory at scale, the profile and the A/B runs of two servers
(registered in tables.py; Ray's are in cluster.py)."""

from __future__ import annotations

from collections.abc import Sequence

from figures import Doc, FigureError, Rows, f2, met, n

# --- rac bench (results/bench.json) ---


def bench_ceiling(docs: Sequence[Doc]) -> Rows:
    (d,) = docs
    rows = []
    for key, what in (("served_layout", "the server's layout"), ("single_process", "one process, every core")):
        c = ("ceiling", key)
        threads = f" x {d.num(*c, 'encoder_threads'):.0f} encoder thread(s)" if key == "served_layout" else ""
        rows.append(
            [what, f"{d.num(*c, 'processes'):.0f}{threads}", n(d.num(*c, "img_per_s")), f2(d.num(*c, "cores_busy"))]
        )
    return ["in-process ceiling", "processes", "img/s", "cores busy"], rows


def bench_encoder(docs: Sequence[Doc]) -> Rows:
    (d,) = docs
    batches = d.keys("encoder")
    return ["batch", *batches], [["img/s", *(n(d.num("encoder", b)) for b in batches)]]


def bench_http(docs: Sequence[Doc]) -> Rows:
    (d,) = docs
    ceiling = d.num("ceiling", "served_layout", "img_per_s")
    rows = []
    for c in d.keys("http"):
        h = ("http", c)
        rows.append(
            [
                c,
                n(d.num(*h, "req_per_s")),
                f2(d.num(*h, "p50_ms")),
                f2(d.num(*h, "p99_ms")),
                n(d.num(*h, "non_2xx")),
                f2(d.num(*h, "req_per_s") / ceiling),
                f2(d.num(*h, "client_cores")),
            ]
        )
    hit = ("cache_hit",)
    rows.append(
        [
            "1 (cache hit)",
            n(d.num(*hit, "req_per_s")),
            f2(d.num(*hit, "p50_ms")),
            f2(d.num(*hit, "p99_ms")),
            n(d.num(*hit, "non_2xx")),
            "",
            f2(d.num(*hit, "client_cores")),
        ]
    )
    return ["connections", "req/s", "p50 ms", "p99 ms", "non-2xx", "vs served ceiling", "wrk CPU (cores)"], rows


def bench_overload(docs: Sequence[Doc]) -> Rows:
    (d,) = docs
    rows = []
    for c in d.keys("overload"):
        o = ("overload", c)
        statuses = d.get(*o, "statuses")
        if not isinstance(statuses, dict):
            raise FigureError(f"results/{d.name}: overload/{c}/statuses is not an object")
        other = sum(d.num(*o, "statuses", s) for s in statuses if s not in ("200", "503"))
        refused = d.get(*o, "refused_p99_ms")
        rows.append(
            [
                c,
                n(d.num(*o, "ok_per_s")),
                n(d.num(*o, "refused_per_s")),
                n(d.num(*o, "ok_p50_ms"), 1),
                n(d.num(*o, "ok_p99_ms"), 1),
                "-" if refused is None else n(d.num(*o, "refused_p99_ms"), 1),
                n(d.num(*o, "readyz_p99_ms"), 1),
                n(other),
                n(d.num(*o, "cache_errors")),
                n(d.num(*o, "server_rss_mb")),
                f2(d.num(*o, "client_cores")),
            ]
        )
    header = ["connections", "ok/s", "refused/s", "ok p50 ms", "ok p99 ms", "refused p99 ms", "/readyz p99 ms"]
    return [*header, "other errors", "cache errors", "server RSS MB", "generator CPU (cores)"], rows


def bench_protocols(docs: Sequence[Doc]) -> Rows:
    (d,) = docs
    rows = []
    for c in d.keys("v2_http"):  # the levels all three were run at (/classify alone also at 64)
        base = d.num("http", c, "req_per_s")
        for key, what in (("http", "POST /classify"), ("v2_http", "v2 REST (binary)"), ("v2_grpc", "v2 gRPC")):
            r = (key, c)
            raw = d.get(*r)
            errors = (
                d.num(*r, "non_2xx") + d.num(*r, "socket_errors")
                if isinstance(raw, dict) and "non_2xx" in raw
                else d.num(*r, "non_ok") + sum(d.num(*r, "errors", e) for e in d.keys(*r, "errors"))
            )
            rows.append(
                [
                    what,
                    c,
                    n(d.num(*r, "req_per_s")),
                    f2(d.num(*r, "p50_ms")),
                    f2(d.num(*r, "p99_ms")),
                    n(errors),
                    f2(d.num(*r, "req_per_s") / base),
                    f2(d.num(*r, "outside_batches_cpu_ms_per_request")),
                    f2(d.num(*r, "batch_cpu_ms_per_image")),
                    f2(d.num(*r, "client_cores")),
                ]
            )
    header = ["API", "connections", "req/s", "p50 ms", "p99 ms", "errors", "vs /classify"]
    cpu = ["server CPU ms/request outside the batches", "batches' CPU ms/image", "client CPU (cores)"]
    return [*header, *cpu], rows


def bench_targets(docs: Sequence[Doc]) -> Rows:
    (d,) = docs
    r = ("ratios",)
    hit = d.num("cache_hit", "p50_ms")
    ready = d.num("overload", "1024", "readyz_p99_ms")
    rows = [
        (
            "HTTP at 16 connections / served-layout ceiling",
            "at least 0.85",
            d.num(*r, "http_c16_over_served_ceiling"),
            0.85,
            True,
        ),
        ("cache-hit p50 (ms)", "at most 0.5", hit, 0.5, False),
        ("p99 / p50 at 16 connections", "under 3", d.num(*r, "http_c16_p99_over_p50"), 3.0, False),
        ("ok/s at 1024 connections / at 64", "at least 0.8", d.num(*r, "overload_ok_c1024_over_c64"), 0.8, True),
        ("/readyz p99 at 1024 connections (ms)", "at most 100", ready, 100.0, False),
        ("v2 REST / `/classify` at 16 connections", "at least 0.9", d.num(*r, "v2_http_c16_over_http"), 0.9, True),
        ("v2 gRPC / v2 REST at 16 connections", "at least 0.95", d.num(*r, "v2_grpc_c16_over_v2_http"), 0.95, True),
    ]
    return ["target", "wanted", "measured", ""], [
        [what, want, f2(v), met(v >= bound if at_least else v <= bound)] for what, want, v, bound, at_least in rows
    ]


# --- memory at scale, Ray ---


def scale(docs: Sequence[Doc]) -> Rows:
    (d,) = docs
    rows = []
    for size in d.keys("sizes"):
        s = ("sizes", size)
        disk = (*s, "disk_mb")
        lat = [
            f"{d.num(*s, *where, b, what, 'p50_ms'):.2f} / {d.num(*s, *where, b, what, 'p99_ms'):.2f}"
            for where, what in ((("in_process",), "search_gather"), (("http",), "wall"))
            for b in ("batch1", "batch32")
        ]
        rows.append(
            [
                n(float(size)),
                str(d.get(*s, "index")),
                f"{d.num(*s, 'recall_at_k'):.4f}",
                n(d.num(*s, "build_s")),
                *(n(d.num(*disk, f)) for f in ("index.faiss", "keys.npy", "values.npy")),
                f"{d.num(*s, 'http', 'startup_s'):.1f}",
                n(d.num(*s, "http", "pss_anon_mb")),
                *lat,
            ]
        )
    header = ["items", "index", "recall@k", "build s", "index MB", "keys MB", "values MB", "start-up s", "PSS anon MB"]
    return [*header, "in-process search+gather p50/p99 ms, b1", "b32", "HTTP p50/p99 ms, b1", "b32"], rows


def scale_search(docs: Sequence[Doc]) -> Rows:
    (d,) = docs
    rows = []
    for size in d.keys("sizes"):
        s = ("sizes", size)
        p = [
            f"{d.num(*s, *w, b, x, 'p50_ms'):.2f} / {d.num(*s, *w, b, x, 'p99_ms'):.2f}"
            for w, x in ((("http",), "server_search"), (("in_process",), "search"))
            for b in ("batch1", "batch32")
        ]
        rows.append([n(float(size)), p[0], p[1], f"{d.num(*s, 'in_process', 'startup_s'):.1f}", p[2], p[3]])
    header = ["items", "HTTP server search p50/p99 ms, b1", "b32", "in-process start-up s"]
    return [*header, "in-process search p50/p99 ms, b1", "b32"], rows


def scale_target(docs: Sequence[Doc]) -> Rows:
    """The target: p99 at the largest memory at most 2x the p99 at the smallest, from the first request."""
    (d,) = docs
    sizes = d.keys("sizes")
    small, large = ("sizes", sizes[0]), ("sizes", sizes[-1])
    rows = []
    for where, what, label in (("http", "wall", "HTTP"), ("in_process", "search_gather", "in-process search+gather")):
        for b in ("batch1", "batch32"):
            a, z = d.num(*small, where, b, what, "p99_ms"), d.num(*large, where, b, what, "p99_ms")
            rows.append([f"{label}, {b.replace('batch', 'batch ')}", f2(a), f2(z), f"{z / a:.2f}x", met(z / a <= 2)])
    return ["p99 ms", f"{n(float(sizes[0]))} items", f"{n(float(sizes[-1]))} items", "ratio", "at most 2x"], rows


def load(docs: Sequence[Doc]) -> Rows:
    (d,) = docs
    return ["users", "seconds", "req/s", "p50 ms", "p95 ms", "p99 ms", "failures", "cache hit ratio", "locust CPU"], [
        [
            n(d.num("users")),
            n(d.num("seconds")),
            n(d.num("req_per_s")),
            n(d.num("p50_ms")),
            n(d.num("p95_ms")),
            n(d.num("p99_ms")),
            f"{n(d.num('failures'))} / {n(d.num('requests'))}",
            f2(d.num("cache_hit_ratio")),
            f2(d.num("locust_cpu_cores")),
        ]
    ]


# --- filtered search (results/filters.json) ---


def filters(docs: Sequence[Doc]) -> Rows:
    (d,) = docs
    rows = []
    for memory in ("demo", "scale"):
        if memory not in d.keys():  # noqa: SIM118 (a Doc, not a dict): the scale memory only where --scale named one
            continue
        items = n(d.num(memory, "items"))
        for name, what in (("none", "no filter"), ("half", "tag=half (50%)"), ("twentieth", "tag=twentieth (5%)")):
            r = (memory, name)
            ratio = "" if name == "none" else f2(d.num(memory, f"{name}_p50_over_none"))
            rows.append(
                [items, what, n(d.num(*r, "req_per_s")), f2(d.num(*r, "p50_ms")), f2(d.num(*r, "p99_ms")), ratio]
            )
    return ["items", "filter", "req/s at 16 connections", "p50 ms", "p99 ms", "p50 / unfiltered"], rows


def filters_accuracy(docs: Sequence[Doc]) -> Rows:
    (d,) = docs
    rows = [
        [name, *(f"{d.num('accuracy', name, b):.2f}" for b in ("all", "many", "mid", "few"))]
        for name in d.keys("accuracy")
    ]
    return ["memory searched (one server, one head)", "all", "many", "mid", "few"], rows
