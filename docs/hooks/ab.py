"""Renderers of where the time goes and of the A/B runs of two servers (loadtests.profile, loadtests.protocols,
loadtests.opcodes), registered in tables.py."""

from __future__ import annotations

from collections.abc import Sequence

from figures import Doc, Rows, f2, n


def profile(docs: Sequence[Doc]) -> Rows:
    (d,) = docs
    return ["part", "share of busy samples"], [[p, f"{d.num('parts_pct', p):.1f}%"] for p in d.keys("parts_pct")]


def _rounds(d: Doc) -> list[tuple[int, str, tuple[str | int, ...]]]:
    """(round number, checkout name, key path) for every checkout of every round."""
    out: list[tuple[int, str, tuple[str | int, ...]]] = []
    for i in range(d.count("rounds")):
        out += [(i + 1, name, ("rounds", i, name)) for name in d.keys("rounds", i)]
    return out


def protocols(docs: Sequence[Doc]) -> Rows:
    """Two checkouts' rounds of v2 REST and gRPC (the native driver): throughput and what a request cost."""
    (d,) = docs
    rows = []
    for i, name, r in _rounds(d):
        c = d.keys(*r, "v2_http")[0]
        rest, grpc = (*r, "v2_http", c), (*r, "v2_grpc_p0", c)
        pairs = [
            " / ".join(fmt.format(d.num(*x, k)) for x in (rest, grpc))
            for k, fmt in (
                ("server_cpu_ms_per_request", "{:.2f}"),
                ("outside_batches_cpu_ms_per_request", "{:.3f}"),
                ("mean_batch", "{:.1f}"),
            )
        ]
        rest_s, grpc_s = d.num(*rest, "req_per_s"), d.num(*grpc, "req_per_s")
        rows.append([str(i), name, n(rest_s), n(grpc_s), f2(grpc_s / rest_s), *pairs])
    header = ["round", "server", "v2 REST req/s", "v2 gRPC req/s", "gRPC / REST", "server CPU ms/request, REST / gRPC"]
    return [*header, "outside the batches, REST / gRPC", "mean batch, REST / gRPC"], rows


def spread_ab(docs: Sequence[Doc]) -> Rows:
    """Two checkouts' rounds of every API: how the connections fell over the processes, and what that served."""
    (d,) = docs
    rows = []
    for i, name, r in _rounds(d):
        for api, label in (("classify", "POST /classify"), ("v2_http", "v2 REST"), ("v2_grpc_p0", "v2 gRPC")):
            x = (*r, api, d.keys(*r, api)[0])
            held = " / ".join(
                n(d.num(*x, "connections_per_process", j)) for j in range(d.count(*x, "connections_per_process"))
            )
            rows.append([str(i), name, label, held, n(d.num(*x, "req_per_s")), f"{d.num(*x, 'mean_batch'):.1f}"])
    return ["round", "server", "API", "connections per process", "req/s", "mean batch"], rows


def protocol_drivers(docs: Sequence[Doc]) -> Rows:
    (d,) = docs
    rows = []
    for i, _, r in _rounds(d):
        c = d.keys(*r, "v2_http")[0]
        rest = d.num(*r, "v2_http", c, "req_per_s")
        for key in d.keys(*r):
            if key.startswith("v2_grpc_p"):
                g = (*r, key, c)
                rows.append(
                    [
                        str(i),
                        _driver(d, g),
                        n(rest),
                        n(d.num(*g, "req_per_s")),
                        f2(d.num(*g, "req_per_s") / rest),
                        f2(d.num(*g, "client_cpu_ms_per_request")),
                    ]
                )
    return [
        "round",
        "gRPC load generator",
        "v2 REST req/s",
        "v2 gRPC req/s",
        "gRPC / REST",
        "generator CPU ms/request",
    ], rows


def _driver(d: Doc, run: tuple[str | int, ...]) -> str:
    """The gRPC load generator of a run: native (loadtests/grpc_load.cc) or Python in so many processes."""
    if run[-2] == "v2_grpc_p0":
        return "native, 1 thread"
    processes = d.num(*run, "processes")
    return f"Python, {processes:.0f} process{'es' if processes != 1 else ''}"


def classify_ab(docs: Sequence[Doc]) -> Rows:
    return _ab(docs, "classify", "/classify req/s at 16 connections")


def request_path_ab(docs: Sequence[Doc]) -> Rows:
    return _ab(docs, "classify_hits", "/classify req/s at 16 connections, one image (cache hits)")


def request_path_c64_ab(docs: Sequence[Doc]) -> Rows:
    return _ab(docs, "classify", "/classify req/s at 64 connections", outside=True)


def gc_young_ab(docs: Sequence[Doc]) -> Rows:
    """One checkout under two settings of the collector's young generation: what /classify cost, and the
    collector's own share (rac_gc_cpu_seconds)."""
    (d,) = docs
    rows = []
    for i, name, r in _rounds(d):
        x = (*r, "classify", d.keys(*r, "classify")[0])
        settings = d.get("checkouts", name, "settings")
        young = str(settings.get("RAC_GC_YOUNG_OBJECTS", "50000 (default)")) if isinstance(settings, dict) else "?"
        rows.append(
            [
                str(i),
                young,
                n(d.num(*x, "req_per_s")),
                f2(d.num(*x, "server_cpu_ms_per_request")),
                f"{d.num(*x, 'outside_batches_cpu_ms_per_request'):.3f}",
                f"{d.num(*x, 'batch_cpu_ms_per_image'):.3f}",
                f"{d.num(*x, 'gc_cpu_ms_per_request'):.4f}",
            ]
        )
    head = ["round", "young generation", "/classify req/s", "server CPU ms/request", "outside the batches"]
    return [*head, "batches ms/image", "collector ms/request"], rows


def v2_rest_plain_ab(docs: Sequence[Doc]) -> Rows:
    return _ab(docs, "v2_http", "v2 REST req/s at 16 connections", outside=True)


def _ab(docs: Sequence[Doc], api: str, label: str, outside: bool = False) -> Rows:
    """Two checkouts' rounds (python -m loadtests.protocols --checkout ...) of one API: what each served, and
    with `outside` the server's CPU a request outside the batches (the request path's own)."""
    (d,) = docs
    rows = []
    for i, name, r in _rounds(d):
        c = d.keys(*r, api)[0]
        x = (*r, api, c)
        row = [str(i), name, n(d.num(*x, "req_per_s")), f2(d.num(*x, "server_cpu_ms_per_request"))]
        row += [f"{d.num(*x, 'outside_batches_cpu_ms_per_request'):.3f}"] if outside else []
        rows.append([*row, f"{d.num(*x, 'mean_batch'):.1f}"])
    head = ["round", "server", label, "server CPU ms/request"]
    return [*head, *(["outside the batches"] if outside else []), "mean batch"], rows


def opcodes_ab(docs: Sequence[Doc]) -> Rows:
    """Python opcodes the event loop ran a /classify request, per checkout: in all, and in each file that ran the
    most of them in any checkout."""
    (d,) = docs
    names = d.keys("checkouts")
    shown: list[str] = []
    for name in names:
        shown += [f for f in d.keys("checkouts", name, "by_file")[:8] if f not in shown]
    rows = [["all", *(n(d.num("checkouts", name, "opcodes_per_request")) for name in names)]]
    for f in shown:
        rows.append([f"`{f}`", *(n(_or_zero(d, ("checkouts", name, "by_file", f))) for name in names)])
    return ["opcodes a request", *names], rows


def _or_zero(d: Doc, keys: tuple[str, ...]) -> float:
    return d.num(*keys) if keys[-1] in d.keys(*keys[:-1]) else 0.0


def opcodes_protocols_ab(docs: Sequence[Doc]) -> Rows:
    """Python opcodes the event loop ran a request, per protocol (one loadtests.opcodes file each) and checkout."""
    names = docs[0].keys("checkouts")
    rows = []
    for d in docs:
        counts = [d.num("checkouts", name, "opcodes_per_request") for name in names]
        rows.append([str(d.get("protocol")), *(n(c) for c in counts), f"{counts[-1] / counts[0] - 1:+.0%}"])
    return ["protocol", *names, "change"], rows


def outside_ab(docs: Sequence[Doc]) -> Rows:
    """Two checkouts' rounds of every API they served (python -m loadtests.protocols --classify --grpc-processes
    0): the server's CPU a request outside the batches (the request path's own), and what each served."""
    (d,) = docs
    apis = {"classify": "/classify", "v2_http": "v2 REST", "v2_grpc_p0": "v2 gRPC"}
    rows = []
    for i, name, r in _rounds(d):
        row = [str(i), name]
        for api in apis:
            x = (*r, api, d.keys(*r, api)[0])
            row.append(f"{d.num(*x, 'outside_batches_cpu_ms_per_request'):.3f} ({n(d.num(*x, 'req_per_s'))})")
        rows.append(row)
    return ["round", "server", *(f"{label}: ms outside the batches (req/s)" for label in apis.values())], rows
