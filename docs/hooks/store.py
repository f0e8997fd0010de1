"""Renderers of the memory store's tables: filtered search (loadtests/filters.py) and several named memories
on one server (loadtests/memories.py), registered in tables.py."""

from __future__ import annotations

from collections.abc import Sequence

from figures import Doc, Rows, f2, met, n

FILTERS = (("none", "no filter", "100%"), ("half", "tag=half", "50%"), ("twentieth", "tag=twentieth", "5%"))


def filters(docs: Sequence[Doc]) -> Rows:
    """/classify at 16 connections, new images, with each filter, on the demo memory and a 1M-item one."""
    (d,) = docs
    rows = []
    for memory in ("demo", "scale"):
        if memory not in d.keys():  # noqa: SIM118 (Doc.keys)
            continue
        items = d.num(memory, "items")
        for key, query, kept in FILTERS:
            r = (memory, key)
            p50 = d.num(*r, "p50_ms")
            over = "" if key == "none" else f2(d.num(memory, f"{key}_p50_over_none"))
            goal = met(d.num(memory, "half_p50_over_none") <= 1.5) if key == "half" else ""
            rows.append(
                [n(items), query, kept, n(d.num(*r, "req_per_s")), f2(p50), f2(d.num(*r, "p99_ms")), over, goal]
            )
    header = ["items", "filter", "kept", "req/s", "p50 ms", "p99 ms", "p50 / unfiltered", "goal: ≤ 1.5x at 50%"]
    return header, rows


def filters_accuracy(docs: Sequence[Doc]) -> Rows:
    """Test top-1 through HTTP: the whole memory, and the downstream items alone by a request parameter."""
    (d,) = docs
    rows = [
        [name, *(f"{d.num('accuracy', name, b):.1f}" for b in ("all", "many", "mid", "few"))]
        for name in d.keys("accuracy")
    ]
    return ["memory searched", "all", "many", "mid", "few"], rows


def memories(docs: Sequence[Doc]) -> Rows:
    """One server (two processes) with one memory, then three: the memory files, RSS and PSS of its processes."""
    (d,) = docs
    rows = []
    for key, what in (("one", "demo"), ("three", "demo, downstream, external")):
        t = (key, "total")
        rows.append(
            [
                what,
                f"{d.num(key, 'memory_files_mb'):,.1f}",
                f"{d.num(*t, 'rss_mb'):,.1f}",
                f"{d.num(*t, 'pss_mb'):,.1f}",
                f"{d.num(*t, 'pss_anon_mb'):,.1f}",
                f"{d.num(*t, 'pss_file_mb'):,.1f}",
            ]
        )
    header = ["memories", "memory files MB", "RSS MB (sum)", "PSS MB (sum)", "PSS anonymous", "PSS file-backed"]
    return header, rows
