"""Micro-batching with back-pressure.

Admission counts the images a server has accepted and not yet answered, and the request bodies it holds;
past its limits a request is refused at once (503), before its body is read, and counted, so latency and
memory stay bounded under overload. The batcher gathers queued jobs into one batch (up to max_batch,
waiting at most max_wait for images that are still on their way: in cache lookup) and runs it
in a worker thread, off the event loop, while the queue fills. At most `in_flight` batches run at once: one
where a batch keeps the cores busy, more where it mostly waits (a sharded memory's round trips to its shards).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, NoReturn, TypeVar

from service.metrics import Metrics

J = TypeVar("J")  # a job
R = TypeVar("R")  # its result


async def cancel(task: asyncio.Task[None] | None) -> None:
    """Stop a background loop (a task that runs until cancelled) and wait until it has."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Overloaded(Exception):
    """More images are pending than the server admits: answer 503 with Retry-After."""


class Admission:
    """What one server process has taken on, each request checked when it arrives, before its body is read:
    images admitted and not yet answered plus uploads still arriving (each at least one image) against
    `limit`, and the bytes of the request bodies held in memory against `max_bytes`."""

    def __init__(self, limit: int, metrics: Metrics, max_bytes: int = 1 << 62):
        self.limit, self.max_bytes, self.metrics = limit, max_bytes, metrics
        self.pending = 0  # images admitted and not yet answered
        self.uploading = 0  # requests whose bodies are still arriving
        self.bytes = 0  # body bytes held by requests in progress

    def _refuse(self, why: str) -> NoReturn:
        self.metrics.refused.inc()
        raise Overloaded(why)

    @contextlib.contextmanager
    def admit(self, n: int) -> Iterator[None]:
        """n images whose bodies are in: the upload's own slot was given back when its body arrived."""
        if self.pending + self.uploading + n > self.limit:
            self._refuse(f"{self.pending} images pending and {self.uploading} arriving, limit {self.limit}")
        self.pending += n
        self.metrics.queue_depth.set(self.pending)
        try:
            yield
        finally:
            self.pending -= n
            self.metrics.queue_depth.set(self.pending)

    def upload(self, declared: int | None) -> Upload:
        """A request at the door: it holds one image slot until its body has arrived, and its body's bytes
        until it is answered (its Content-Length, or counted as they arrive when it has none). Close it."""
        if self.pending + self.uploading + 1 > self.limit:
            self._refuse(f"{self.pending} images pending and {self.uploading} arriving, limit {self.limit}")
        upload = Upload(self)
        upload.received(declared or 0)
        self.uploading += 1
        return upload


class Upload:
    def __init__(self, admission: Admission):
        self.admission, self.bytes, self.arriving = admission, 0, True

    def received(self, n: int) -> None:
        a = self.admission
        if a.bytes + n > a.max_bytes:
            a._refuse(f"{a.bytes} bytes of request bodies held, limit {a.max_bytes}")
        a.bytes += n
        self.bytes += n

    def arrived(self) -> None:
        """The body is in (or the client left): give the image slot back, to be taken by admit()."""
        if self.arriving:
            self.arriving = False
            self.admission.uploading -= 1

    def close(self) -> None:
        self.arrived()
        self.admission.bytes -= self.bytes
        self.bytes = 0


@dataclass
class _Queued(Generic[J, R]):
    job: J
    future: asyncio.Future[R] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Batcher(Generic[J, R]):
    def __init__(
        self,
        run: Callable[[list[J]], list[R]],
        max_batch: int,
        max_wait_s: float,
        metrics: Metrics,
        in_flight: int = 1,
    ):
        self.run, self.metrics = run, metrics
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.queue: asyncio.Queue[_Queued[J, R]] = asyncio.Queue()
        self.arriving = 0  # jobs on their way: in cache lookup, not yet submitted
        self._wake: asyncio.Future[None] | None = None  # set while a batch being gathered waits for more
        self.worker = ThreadPoolExecutor(in_flight, thread_name_prefix="batch")
        self.slots = asyncio.Semaphore(in_flight)
        self._running: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        await cancel(self._task)
        if self._running:  # batches already running are answered
            await asyncio.gather(*self._running, return_exceptions=True)
        self.worker.shutdown(wait=True)

    async def submit(self, job: J) -> R:
        queued: _Queued[J, R] = _Queued(job)
        self.queue.put_nowait(queued)  # unbounded queue: admission already bounds what can be in it
        self._wakeup()
        return await queued.future

    def _wakeup(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    @contextlib.contextmanager
    def coming(self) -> Iterator[None]:
        """Around a job's preparation (its cache lookup): while it is on its way, a batch being gathered may
        wait for it; once it is submitted, answered or failed, nobody waits for it."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1
            if self.arriving == 0:
                self._wakeup()  # a batch waiting for it goes now

    async def _gather(self) -> list[_Queued[J, R]]:
        batch = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            if self.arriving == 0 or loop.time() >= deadline:  # nothing else on its way, or no more time
                break
            # Wait for the next job, the last one on its way, or the deadline: one future and one timer
            # (asyncio.wait_for would make a task per wait).
            self._wake = loop.create_future()
            timer = loop.call_at(deadline, self._wakeup)
            try:
                await self._wake
            finally:
                timer.cancel()
                self._wake = None
        return batch

    async def _loop(self) -> None:
        while True:
            await self.slots.acquire()  # before gathering: with one slot, a batch gathers once the last is done
            batch = await self._gather()
            self.metrics.batch_size.observe(len(batch))
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[_Queued[J, R]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self.worker, self.run, [q.job for q in batch])
        except Exception as e:  # a failed batch fails its requests, never the loop
            for q in batch:
                if not q.future.done():
                    q.future.set_exception(e)
        else:
            for q, r in zip(batch, results, strict=True):
                if not q.future.done():  # the client may have gone away
                    q.future.set_result(r)
        finally:
            self.slots.release()
