"""Open Inference Protocol requests for the load generators, built once ahead of time, and the gRPC load driver.

    python -m loadtests.v2load --target 127.0.0.1:8001 --requests FILE --concurrency 16 --seconds 10 --out OUT.json

The driver is its own process (so its CPU is its own, as wrk's is): grpc.aio, `concurrency` callers, each on
its own connection (a channel with a local subchannel pool: the kernel spreads connections over the server
processes), sending prepared, already serialised ModelInferRequests in turn (no per-call serialisation), timing
each call. `--processes` spreads the callers over several such processes (loadtests/protocols.py compares:
on the 2-core host, 4 processes cost more client CPU per request than one and were no faster). FILE holds
the requests as `<length>\\n<bytes>` records (loadtests/overload.py writes and reads them).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import resource
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.http as th
from tritonclient.grpc import service_pb2
from tritonclient.utils import serialize_byte_tensor

from loadtests.overload import read_bodies

METHOD = "/inference.GRPCInferenceService/ModelInfer"
HEADER_LENGTH = "Inference-Header-Content-Length"


def http_body(png: bytes) -> tuple[bytes, int]:
    """One image as tritonclient.http sends it by default: (body, Inference-Header-Content-Length)."""
    tensor = th.InferInput("IMAGE", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([png], dtype=object))
    body, header_length = th.InferenceServerClient.generate_request_body([tensor])
    return body, header_length


def grpc_request(png: bytes) -> bytes:
    """One image as a serialised ModelInferRequest, its data in raw_input_contents (as tritonclient.grpc)."""
    request = service_pb2.ModelInferRequest(model_name="rac")
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(serialize_byte_tensor(np.array([png], dtype=object)).item())
    return bytes(request.SerializeToString())


async def drive(target: str, requests: list[bytes], concurrency: int, seconds: float) -> dict[str, Any]:
    """One process's callers; the stats of their calls, with the raw latencies (seconds) under "latencies"."""
    options = [("grpc.use_local_subchannel_pool", 1)]  # else channels to one address share one connection
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(concurrency)]
    calls = [c.unary_unary(METHOD) for c in channels]  # bytes in, bytes out: nothing serialised per call
    turn = itertools.count()
    for call in calls:  # connect (and check the answer) before the clock starts
        answer = service_pb2.ModelInferResponse.FromString(await call(requests[next(turn) % len(requests)]))
        if not answer.outputs:
            raise RuntimeError(f"{target} answered without outputs: {answer}")
    latencies: list[float] = []
    errors: Counter[str] = Counter()

    async def caller(call: Any, deadline: float) -> None:
        while time.perf_counter() < deadline:
            body = requests[next(turn) % len(requests)]
            t = time.perf_counter()
            try:
                await call(body, timeout=10)
                latencies.append(time.perf_counter() - t)
            except grpc.aio.AioRpcError as e:
                errors[e.code().name] += 1

    cpu = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    await asyncio.gather(*(caller(call, start + seconds) for call in calls))
    elapsed = time.perf_counter() - start
    used = resource.getrusage(resource.RUSAGE_SELF)
    for c in channels:
        await c.close()
    cores = (used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime) / elapsed
    return {"latencies": latencies, "seconds": elapsed, "errors": dict(errors), "client_cores": cores}


def _share(target: str, path: Path, concurrency: int, seconds: float, offset: int) -> dict[str, Any]:
    requests = read_bodies(path)
    requests = requests[offset:] + requests[:offset]  # each process starts at its own place in the images
    return asyncio.run(drive(target, requests, concurrency, seconds))


def run(target: str, path: Path, concurrency: int, seconds: float, processes: int) -> dict[str, Any]:
    """`concurrency` callers over `processes` processes (at most one per caller), their figures together."""
    processes = max(1, min(processes, concurrency))
    counts = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    step = len(read_bodies(path)) // processes
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(_share, target, path, n, seconds, i * step) for i, n in enumerate(counts)]
        parts = [j.result() for j in jobs]
    latencies = [x for p in parts for x in p["latencies"]]
    errors: Counter[str] = Counter()
    for p in parts:
        errors.update(p["errors"])
    elapsed = max(p["seconds"] for p in parts)
    ms = np.array(latencies or [0.0]) * 1000
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "req_per_s": sum(len(p["latencies"]) / p["seconds"] for p in parts),
        "errors": dict(errors),
        "non_ok": sum(errors.values()),
        **{f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 90, 99)},
        "max_ms": float(ms.max()),
        "client_cores": sum(p["client_cores"] for p in parts),
        "processes": processes,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="host:port of the gRPC service")
    p.add_argument("--requests", type=Path, required=True)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--processes", type=int, default=1, help="processes the callers are spread over")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    stats = run(a.target, a.requests, a.concurrency, a.seconds, a.processes)
    a.out.write_text(json.dumps(stats))


if __name__ == "__main__":
    main()
