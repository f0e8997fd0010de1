"""Renderers of the Ray tables: the sharded service against one process, the A/B of two checkouts on Ray, and
embedding on Ray Data (registered in tables.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from figures import Doc, Rows, f2, n


def ray(docs: Sequence[Doc]) -> Rows:
    (d,) = docs
    rows = []
    for key, what in (
        ("single_process", "single process"),
        ("ray", "Ray, 2 shards x 2 replicas"),
        ("ray_in_flight_4", "Ray, 4 batches in flight"),
        ("ray_throughput_optimized", "Ray, RAY_SERVE_THROUGHPUT_OPTIMIZED"),
        ("ray_haproxy", "Ray, the same behind HAProxy"),
        ("ray_haproxy_2_ingress", "Ray, the same with 2 ingress replicas"),
    ):
        if key not in d.keys():  # noqa: SIM118 (Doc.keys, not a dict's): a lever this run could not start (results' "failed" says why)
            continue
        for c in d.keys(key):
            r = (key, c)
            rows.append(
                [
                    what,
                    c,
                    n(d.num(*r, "req_per_s")),
                    f2(d.num(*r, "p50_ms")),
                    f2(d.num(*r, "p99_ms")),
                    _or_dash(d, r, "search_ms_per_batch", f2),
                    _or_dash(d, r, "images_per_batch", lambda x: f"{x:.1f}"),
                    n(d.num(*r, "non_2xx") + d.num(*r, "socket_errors")),
                ]
            )
    header = ["service", "connections", "req/s", "p50 ms", "p99 ms", "search stage ms per batch", "images per batch"]
    return [*header, "errors"], rows


def _or_dash(d: Doc, at: tuple[str, str], key: str, fmt: Callable[[float], str]) -> str:
    """A figure, or "-" where the run did not measure it (the stages of a run with several ingress replicas)."""
    return "-" if d.get(*at, key) is None else fmt(d.num(*at, key))


def ray_build(docs: Sequence[Doc]) -> Rows:
    """The embedding step of `rac memory add`, here and on Ray Data, then the estimate for 100M and 1B items."""
    (d,) = docs
    rows = [
        ["rac memory add, this process", "1 x 2 cores", n(d.num("single_process", "images_per_s")), "", ""],
        ["rac memory add --ray", "2 x 1 CPU", n(d.num("ray", "images_per_s")), "", ""],
    ]
    cpus = d.num("estimate", "node_cpus")
    for nodes in d.keys("estimate", "hours", "100M"):
        rows.append(
            [
                "estimate",
                f"{nodes} x {cpus:.0f} CPUs",
                n(d.num("estimate", "images_per_s_per_cpu") * cpus * int(nodes)),
                f"{d.num('estimate', 'hours', '100M', nodes):,.1f}",
                f"{d.num('estimate', 'hours', '1B', nodes):,.1f}",
            ]
        )
    return ["embedding", "nodes", "images/s", "hours for 100M", "hours for 1B"], rows


def ray_ab(docs: Sequence[Doc]) -> Rows:
    """Two checkouts' rounds on Ray (python -m loadtests.ray_bench --checkout ...), the best configuration."""
    (d,) = docs
    rows = []
    for i in range(d.count("rounds")):
        for name in d.keys("rounds", i):
            r = ("rounds", i, name)
            rows.append(
                [
                    str(i + 1),
                    name,
                    f2(d.num(*r, "1", "p50_ms")),
                    f2(d.num(*r, "1", "search_ms_per_batch")),
                    n(d.num(*r, "16", "req_per_s")),
                    f"{d.num(*r, '16', 'images_per_batch'):.1f}",
                ]
            )
    header = ["round", "ingress to shards", "p50 ms, 1 connection", "search stage ms", "req/s, 16 connections"]
    return [*header, "images per batch"], rows
