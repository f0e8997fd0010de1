"""The in-process ceiling in the server's own layout: as many processes as the server runs, each with the
encoder threads a server process gets, each decoding, encoding, searching and running the head over its own
distinct images in batches of max_batch at the same time. No HTTP: what the server could reach at best.

Also what the cores did meanwhile (CPU seconds of all processes over the wall time), so that a ceiling
that leaves a core idle is seen to.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

from service.core.batch import Job
from service.core.pipeline import Pipeline
from service.metrics import Metrics
from service.settings import Settings, cores


def _run(pipeline: Pipeline, images: list[bytes]) -> tuple[float, float, float]:
    """Decode and classify every image in batches of max_batch: (start, end, CPU seconds of this process)."""
    s = pipeline.settings
    cpu, t = time.process_time(), time.perf_counter()
    for i in range(0, len(images), s.max_batch):
        pipeline.run_batch([Job(data, None, pipeline.version) for data in images[i : i + s.max_batch]])
    return t, time.perf_counter(), time.process_time() - cpu


def _worker(settings: Settings, images: list[bytes], start: Any, out: Any) -> None:
    pipeline = Pipeline(settings, Metrics())
    pipeline.warmup()
    start.wait()  # every process starts its timed run together
    out.put((len(images), *_run(pipeline, images)))


def served_layout(settings: Settings, images: list[bytes]) -> dict[str, Any]:
    """settings.processes processes, each with settings.encoder_threads (0: the cores shared among them)."""
    processes = settings.processes
    threads = settings.encoder_threads or max(1, cores() // processes)
    each = settings.model_copy(update={"workers": processes, "encoder_threads": threads})
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(processes), ctx.Queue()
    share = len(images) // processes
    procs = [
        ctx.Process(target=_worker, args=(each, images[p * share : (p + 1) * share], start, out))
        for p in range(processes)
    ]
    for p in procs:
        p.start()
    runs = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    n = sum(r[0] for r in runs)
    wall = max(r[2] for r in runs) - min(r[1] for r in runs)
    cpu = sum(r[3] for r in runs)
    return {
        "processes": processes,
        "encoder_threads": threads,
        "images": n,
        "batch": settings.max_batch,
        "img_per_s": n / wall,
        "cores_busy": cpu / wall,
    }


def single_process(settings: Settings, images: list[bytes]) -> dict[str, Any]:
    """The older figure: one process whose encoder uses every core (decode, search and head then run on one)."""
    pipeline = Pipeline(settings.model_copy(update={"workers": 1, "encoder_threads": 0}), Metrics())
    pipeline.warmup()
    t, end, cpu = _run(pipeline, images)
    return {
        "processes": 1,
        "images": len(images),
        "batch": settings.max_batch,
        "img_per_s": len(images) / (end - t),
        "cores_busy": cpu / (end - t),
    }
