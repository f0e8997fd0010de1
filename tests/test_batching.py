import asyncio
import random
import threading
import time

import pytest
from prometheus_client import Counter, Histogram

from loadtests.server import samples
from service import metrics as metrics_module
from service.core.batching import Admission, Batcher, Overloaded
from service.metrics import Metrics


def make(max_batch: int, max_wait_s: float, limit: int = 100, fail_on: int | None = None):  # type: ignore[no-untyped-def]
    m = Metrics()
    sizes: list[int] = []
    threads: set[str] = set()

    def run(jobs: list[int]) -> list[int]:
        sizes.append(len(jobs))
        threads.add(threading.current_thread().name)
        time.sleep(0.01)  # a batch takes time: requests pile up meanwhile
        if fail_on is not None and fail_on in jobs:
            raise RuntimeError("batch failed")
        return [j * 10 for j in jobs]

    admission = Admission(limit, m)
    return Batcher(run, max_batch, max_wait_s, m), admission, sizes, threads, m


async def submit_all(batcher: Batcher, admission: Admission, jobs: list[int]) -> list[object]:
    async def one(j: int) -> object:
        with admission.admit(1):
            return await batcher.submit(j)

    return await asyncio.gather(*(one(j) for j in jobs), return_exceptions=True)


def test_concurrent_jobs_are_batched_in_order_off_the_loop() -> None:
    async def run() -> tuple[list[object], list[int], set[str]]:
        batcher, admission, sizes, threads, _ = make(max_batch=8, max_wait_s=0.05)
        batcher.start()
        results = await submit_all(batcher, admission, list(range(30)))
        await batcher.stop()
        return results, sizes, threads

    results, sizes, threads = asyncio.run(run())
    assert results == [j * 10 for j in range(30)]
    assert sum(sizes) == 30 and max(sizes) == 8 and len(sizes) <= 6
    assert threads == {"batch_0"}  # one worker thread, never the event loop's


def test_a_lone_request_does_not_wait_for_company() -> None:
    async def run() -> float:
        batcher, admission, *_ = make(max_batch=8, max_wait_s=0.5)
        batcher.start()
        t = time.perf_counter()
        await submit_all(batcher, admission, [1])
        elapsed = time.perf_counter() - t
        await batcher.stop()
        return elapsed

    assert asyncio.run(run()) < 0.1  # nothing else admitted: it runs at once, not after max_wait


def test_a_failed_batch_fails_its_jobs_and_the_loop_goes_on() -> None:
    async def run() -> tuple[list[object], list[object]]:
        batcher, admission, *_ = make(max_batch=4, max_wait_s=0.01, fail_on=3)
        batcher.start()
        first = await submit_all(batcher, admission, [1, 2, 3, 4])
        later = await submit_all(batcher, admission, [5, 6])
        await batcher.stop()
        return first, later

    first, later = asyncio.run(run())
    assert all(isinstance(r, RuntimeError) for r in first)
    assert later == [50, 60]


def test_admission_refuses_beyond_its_limit_and_counts_it() -> None:
    m = Metrics()
    admission = Admission(3, m)
    with admission.admit(2):
        with pytest.raises(Overloaded), admission.admit(2):
            pass
        with admission.admit(1):
            assert admission.pending == 3
    assert admission.pending == 0
    assert m.refused._value.get() == 1


@pytest.mark.parametrize("in_flight", [1, 3])
def test_at_most_in_flight_batches_run_at_once(in_flight: int) -> None:
    """Batches that mostly wait (a sharded memory's round trips) overlap up to in_flight, never more; each job
    still gets its own answer."""
    running, most = 0, 0
    lock = threading.Lock()

    def run(jobs: list[int]) -> list[int]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)  # waiting, not computing
        with lock:
            running -= 1
        return [j * 10 for j in jobs]

    async def main() -> list[object]:
        m = Metrics()
        batcher: Batcher[int, int] = Batcher(run, 2, 0.0, m, in_flight)
        batcher.start()
        results = await submit_all(batcher, Admission(100, m), list(range(24)))
        await batcher.stop()
        return results

    t = time.perf_counter()
    assert asyncio.run(main()) == [j * 10 for j in range(24)]
    assert most == in_flight
    if in_flight > 1:  # 12 batches of 0.05 s, overlapped
        assert time.perf_counter() - t < 12 * 0.05


def test_the_batches_cpu_time_is_counted_and_their_waits_are_not() -> None:
    """rac_batch_cpu_seconds: the worker thread's CPU time, so a batch that sleeps (waits) adds next to nothing
    and one that computes adds what it computed."""

    def wait_then_burn(jobs: list[float]) -> list[float]:
        for seconds in jobs:
            time.sleep(seconds)
            end = time.thread_time() + seconds
            while time.thread_time() < end:
                pass
        return jobs

    async def run() -> float:
        m = Metrics()
        batcher: Batcher[float, float] = Batcher(wait_then_burn, 1, 0.0, m)
        batcher.start()
        await batcher.submit(0.1)
        await batcher.submit(0.1)
        await batcher.stop()
        m.flush()
        return float(m.registry.get_sample_value("rac_batch_cpu_seconds_total") or 0.0)

    counted = asyncio.run(run())
    assert 0.2 <= counted < 0.3  # two batches, each 0.1 s asleep and 0.1 s computing


def test_the_collectors_passes_are_counted_by_generation() -> None:
    """rac_gc_cpu_seconds: a pass's CPU time, in the generation it collected; nothing without a pass."""
    import gc

    m = Metrics()

    def counted(generation: str) -> float:
        return m.registry.get_sample_value("rac_gc_cpu_seconds_total", {"generation": generation}) or 0.0

    callback = m.collections()
    gc.callbacks.append(callback)
    gc.disable()  # no pass but the one asked for
    try:
        junk = [[i] for i in range(200_000)]  # objects for a full pass to walk
        assert counted("2") == 0.0
        gc.collect(2)
        del junk
    finally:
        gc.enable()
        gc.callbacks.remove(callback)
    assert counted("2") == 0.0  # kept until flushed, never counted inside a pass
    m.flush()
    full = counted("2")
    assert full > 0.0
    m.flush()  # nothing new: nothing more
    assert counted("2") == full
    assert counted("0") == counted("1") == 0.0


def test_kept_counts_and_observations_once_flushed_equal_prometheus_own_writes() -> None:
    """The metrics a request and a batch write are Kept until flush(): then the exposition is what
    prometheus_client's own inc() and observe() would have written, with counts from two threads at once, values
    on bucket bounds and beyond the last, and nothing counted before the flush."""
    kept, direct = Metrics(), Metrics()
    rng = random.Random(0)
    times = [rng.choice((0.0001, 0.005, 7.0, 0.0)) if i % 3 == 0 else rng.uniform(0, 0.3) for i in range(4000)]

    def count(m: Metrics, part: list[float], own: bool) -> None:
        """prometheus_client's own writes (own), or the Kept ones the service makes."""
        for i, t in enumerate(part):
            if own:
                stage, images = m.stage_seconds.metric.labels("queue"), m.images.metric.labels("miss", "default")
                batch_size, batch_cpu = m.batch_size.metric, m.batch_cpu.metric
                assert isinstance(stage, Histogram) and isinstance(batch_size, Histogram)
                assert isinstance(images, Counter) and isinstance(batch_cpu, Counter)
                stage.observe(t)
                batch_size.observe(i % 40)
                images.inc()
                batch_cpu.inc(t)
            else:
                m.stage_seconds.labels("queue").observe(t)
                m.batch_size.observe(i % 40)
                m.images.labels("miss", "default").inc()
                m.batch_cpu.inc(t)

    threads = [threading.Thread(target=count, args=(kept, times[i::2], False)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    count(direct, times, True)
    assert kept.registry.get_sample_value("rac_images_total", {"outcome": "miss", "memory": "default"}) == 0.0
    kept.flush()

    def exposed(m: Metrics) -> dict[str, float]:
        return {k: round(v, 9) for k, v in samples(m.exposition().decode()).items() if "_created" not in k}

    buckets = [line for line in kept.exposition().decode().splitlines() if "stage_seconds_bucket" in line]
    assert exposed(kept) == exposed(direct) and buckets
    assert buckets == [line for line in direct.exposition().decode().splitlines() if "stage_seconds_bucket" in line]


def test_kept_counts_are_written_past_a_bound_where_nothing_flushes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipeline run without a server (the ceiling, an evaluation) never flushes: its counts do not pile up."""
    monkeypatch.setattr(metrics_module, "KEPT_AT_MOST", 10)
    m = Metrics()
    for _ in range(10):
        m.batch_cpu.inc(1.0)
    assert m.registry.get_sample_value("rac_batch_cpu_seconds_total") == 0.0 and len(m.batch_cpu.amounts) == 10
    m.batch_cpu.inc(1.0)
    assert m.registry.get_sample_value("rac_batch_cpu_seconds_total") == 11.0 and not m.batch_cpu.amounts
