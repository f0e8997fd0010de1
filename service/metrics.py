"""Prometheus metrics, all in one place: a latency histogram per stage and counters for what went wrong.

Where the server runs several processes (PROMETHEUS_MULTIPROC_DIR set, see service/__main__.py), every
process writes its values to files there and /metrics, whichever process answers, reports their sum. In that
mode a process holds one app (the files are per process, not per registry).
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

# prometheus_client chooses file-backed values once, when it is imported: decide alike, once.
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")

STAGES = ("decode", "queue", "encode", "search", "head", "total")
# 0.1 ms .. 5 s: the stages of one batch run from tens of microseconds to tens of milliseconds.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """One registry per app, so that tests can build several apps in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.stage_seconds = Histogram(
            "rac_stage_seconds",
            "Latency of each pipeline stage (batch stages: the batch's time)",
            ["stage"],
            buckets=BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "rac_requests_total", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.images = Counter("rac_images_total", "Images classified or refused, by outcome", ["outcome"], registry=r)
        self.cache = Counter(
            "rac_cache_total",
            "Neighbour cache lookups: hit, miss, error, or stale (an entry whose shape does not fit: ignored)",
            ["result"],
            registry=r,
        )
        self.batch_size = Histogram(
            "rac_batch_size", "Images per encode/search/head batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.queue_depth = Gauge(
            "rac_queue_depth", "Images admitted and not yet answered", multiprocess_mode="livesum", registry=r
        )
        self.refused = Counter("rac_refused_total", "Requests refused with 503 because the queue was full", registry=r)
        # Memory versions (service/versions.py)
        self.memory_version = Gauge(
            "rac_memory_version",
            "Server processes serving each memory version",
            ["version"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.memory_swaps = Counter("rac_memory_swaps_total", "Memory versions swapped in while serving", registry=r)
        self.memory_swap_seconds = Histogram(
            "rac_memory_swap_seconds",
            "From seeing a new memory version to serving it: load, check, pre-fault, warm up, switch",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
            registry=r,
        )
        self.memory_load_failures = Counter(
            "rac_memory_load_failures_total", "Memory versions refused (the old one kept serving)", registry=r
        )
        for stage in STAGES:  # export every series from the start, so dashboards never see a gap
            self.stage_seconds.labels(stage)
        for result in ("hit", "miss", "error", "stale"):
            self.cache.labels(result)

    def exposition(self) -> bytes:
        if MULTIPROCESS_DIR is None:
            return generate_latest(self.registry)
        _forget_dead_processes(MULTIPROCESS_DIR)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, MULTIPROCESS_DIR)
        return generate_latest(merged)

    @staticmethod
    def process_exited() -> None:
        """Drop this process's live gauges from the sum (its counters stay counted)."""
        if MULTIPROCESS_DIR is not None:
            multiprocess.mark_process_dead(os.getpid(), MULTIPROCESS_DIR)


def _forget_dead_processes(directory: str) -> None:
    """A worker that was killed (and replaced by uvicorn) never said so: drop its live gauges too."""
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, directory)
        except PermissionError:  # alive, another user's
            pass
