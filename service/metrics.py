"""Prometheus metrics, all in one place: a latency histogram per stage and counters for what went wrong.

Where the server runs several processes (service/__main__.py hands each a metrics directory, and sets
PROMETHEUS_MULTIPROC_DIR to it for prometheus_client), every process writes its values to files there and
/metrics, whichever process answers, reports their sum. In that mode a process holds one app (the files are
per process, not per registry).

What every request and every batch counts (requests, images, cache lookups, stage times, batch sizes, the
collector's passes) is kept in the process and written by flush(): the pipeline calls it every 0.1 s and an
exposition first, so /metrics sees another process's counts at most that old, as it sees the gauges. A
prometheus_client write takes a lock and, with several processes, checks the pid and writes a memory-mapped
file: a few microseconds, seven times a request on the event loop and twice an image in the batch thread.
"""

from __future__ import annotations

import bisect
import collections
import functools
import itertools
import operator
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values

STAGES = ("decode", "queue", "encode", "search", "head", "total")
# 0.1 ms .. 5 s: the stages of one batch run from tens of microseconds to tens of milliseconds.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


# Written at once past this many, where nothing flushes (a pipeline run without a server: the ceiling, an evaluation).
KEPT_AT_MOST = 65536


class Kept:
    """A counter or a histogram (or a labelled one's child) whose counts and observations wait in its own deque
    until Metrics.flush() writes them: one append each, safe from any thread, and from a collector's pass
    (Metrics.collections), which may start inside a prometheus_client write, holding its lock."""

    __slots__ = ("amounts", "metric")

    def __init__(self, metric: Counter | Histogram, kept: list[Kept]):
        self.metric, self.amounts = metric, deque[float]()
        kept.append(self)  # flush() writes every Kept there is

    def inc(self, amount: float = 1.0) -> None:
        self.amounts.append(amount)
        if len(self.amounts) > KEPT_AT_MOST:
            self.write()

    observe = inc  # an observation waits as a count does: write() tells them apart

    def write(self) -> None:
        """What waits, written: a counter's counts summed into one write, a histogram's observations into one write
        of their sum and one for each bucket they fall in (prometheus_client's observe() puts an amount in the
        first bucket whose bound is at least the amount)."""
        waiting = len(self.amounts)
        if not waiting:
            return
        # as many pops as there were amounts, in C: an amount appended meanwhile (another thread) waits its turn
        amounts = list(map(operator.call, itertools.repeat(self.amounts.popleft, waiting)))
        metric = self.metric
        # type(), not isinstance(): prometheus_client's classes are Protocols, whose isinstance() costs microseconds
        if type(metric) is Histogram:
            metric._sum.inc(sum(amounts))
            bucket = functools.partial(bisect.bisect_left, metric._upper_bounds)
            for i, n in collections.Counter(map(bucket, amounts)).items():
                metric._buckets[i].inc(n)
        elif type(metric) is Counter:
            metric.inc(sum(amounts))


class Labelled:
    """A labelled counter or histogram whose children are looked up once and Kept: prometheus_client's
    labels() builds a tuple of strings and takes a lock at every call."""

    def __init__(self, metric: Counter | Histogram, kept: list[Kept]):
        self.metric, self.kept = metric, kept
        self._children: dict[tuple[str, ...], Kept] = {}

    def labels(self, *values: str) -> Kept:
        return self._children.get(values) or self._add(values)

    def _add(self, values: tuple[str, ...]) -> Kept:
        # two threads may both get here: labels() gives them the same child, and both Kept are written
        child = self._children[values] = Kept(self.metric.labels(*values), self.kept)
        return child


class Metrics:
    """One registry per app, so that tests can build several apps in one process."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        """multiprocess_dir: where every server process writes its values (None: this process alone)."""
        if multiprocess_dir is not None and values.ValueClass is values.MutexValue:
            raise RuntimeError("prometheus_client was imported without PROMETHEUS_MULTIPROC_DIR: no sums possible")
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry()
        r = self.registry
        self.kept: list[Kept] = []  # every Kept metric (and labelled child), whose counts flush() writes
        self.stage_seconds = Labelled(
            Histogram(
                "rac_stage_seconds",
                "Latency of each pipeline stage (batch stages: the batch's time)",
                ["stage"],
                buckets=BUCKETS,
                registry=r,
            ),
            self.kept,
        )
        self.requests = Labelled(
            Counter("rac_requests_total", "HTTP requests by route and status", ["route", "status"], registry=r),
            self.kept,
        )
        self.key_requests = Labelled(
            Counter("rac_key_requests_total", "Requests by API key name (never the key)", ["key"], registry=r),
            self.kept,
        )
        self.images = Labelled(
            Counter(
                "rac_images_total",
                "Images classified or refused, by outcome and memory",
                ["outcome", "memory"],
                registry=r,
            ),
            self.kept,
        )
        self.cache = Labelled(
            Counter(
                "rac_cache_total",
                "Neighbour cache lookups: hit, miss, error, or stale (an entry whose shape does not fit: ignored)",
                ["result"],
                registry=r,
            ),
            self.kept,
        )
        self.batch_size = Kept(
            Histogram(
                "rac_batch_size",
                "Images per encode/search/head batch",
                buckets=(1, 2, 4, 8, 16, 32, 64, 128),
                registry=r,
            ),
            self.kept,
        )
        self.batch_cpu = Kept(
            Counter(
                "rac_batch_cpu_seconds",
                "CPU time the batches took in their worker threads (decode, encode, search, head)",
                registry=r,
            ),
            self.kept,
        )
        self.queue_depth = Gauge(
            "rac_queue_depth",
            "Images admitted and not yet answered (written every 0.1 s)",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.uploads = Gauge(
            "rac_uploads",
            "Requests admitted whose bodies are still arriving (written every 0.1 s)",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.refused = Counter(
            "rac_refused_total",
            "Requests refused with 503 for load (full, waited too long, too many waiting)",
            registry=r,
        )
        self.waiting = Gauge(
            "rac_waiting",
            "Requests waiting at the door for admission, bodies unread",
            multiprocess_mode="livesum",
            registry=r,
        )
        # Memory versions (service/memory/versions.py)
        self.memory_version = Gauge(
            "rac_memory_version",
            "Server processes serving each memory version, by named memory",
            ["memory", "version"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.memory_swaps = Counter(
            "rac_memory_swaps_total", "Memory versions swapped in while serving", ["memory"], registry=r
        )
        self.memory_swap_seconds = Histogram(
            "rac_memory_swap_seconds",
            "From seeing a new memory version to serving it: load, check, pre-fault, warm up, switch",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
            registry=r,
        )
        self.memory_load_failures = Counter(
            "rac_memory_load_failures_total",
            "Memory versions refused (the old one kept serving)",
            ["memory"],
            registry=r,
        )
        self.gc_cpu = Labelled(
            Counter(
                "rac_gc_cpu_seconds",
                "CPU time the garbage collector's passes took, by generation (in whichever thread ran them)",
                ["generation"],
                registry=r,
            ),
            self.kept,
        )
        for stage in STAGES:  # export every series from the start, so dashboards never see a gap
            self.stage_seconds.labels(stage)
        for result in ("hit", "miss", "error", "stale"):
            self.cache.labels(result)
        for generation in ("0", "1", "2"):
            self.gc_cpu.labels(generation)

    def collections(self) -> Callable[[str, dict[str, int]], None]:
        """A callback for gc.callbacks: each pass's CPU time, in rac_gc_cpu_seconds once flushed (writing it at
        once could deadlock: the pass may have started inside a write, holding prometheus_client's lock). Passes
        never overlap, and a pass's start and stop come from the thread that runs it."""
        started = 0.0
        generations = [self.gc_cpu.labels(str(g)).amounts for g in range(3)]

        def callback(phase: str, info: dict[str, int]) -> None:
            nonlocal started
            if phase == "start":
                started = time.thread_time()
            else:  # only kept, never written here, even past KEPT_AT_MOST
                generations[info["generation"]].append(time.thread_time() - started)

        return callback

    def flush(self) -> None:
        """Write what the Kept metrics counted since the last flush (the pipeline does it every 0.1 s, and an
        exposition first)."""
        for kept in self.kept:
            kept.write()

    def exposition(self) -> bytes:
        self.flush()
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        _forget_dead_processes(self.multiprocess_dir)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, self.multiprocess_dir)
        return generate_latest(merged)

    def process_exited(self) -> None:
        """Write what is kept, and drop this process's live gauges from the sum (its counters stay counted)."""
        self.flush()
        if self.multiprocess_dir is not None:
            multiprocess.mark_process_dead(os.getpid(), self.multiprocess_dir)


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
