"""Micro-batching with back-pressure.

Admission counts the images a server has accepted and not yet answered; past its limit a request is
refused at once (503) and counted, so latency stays bounded under overload. The batcher gathers queued
jobs into one batch (up to max_batch, waiting at most max_wait for images that are still being decoded)
and runs it in one worker thread, off the event loop, while the loop gathers the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from service.metrics import Metrics

J = TypeVar("J")  # a job
R = TypeVar("R")  # its result


class Overloaded(Exception):
    """More images are pending than the server admits: answer 503 with Retry-After."""


class Admission:
    def __init__(self, limit: int, metrics: Metrics):
        self.limit, self.metrics, self.pending = limit, metrics, 0

    @contextlib.contextmanager
    def admit(self, n: int) -> Iterator[None]:
        if self.pending + n > self.limit:
            self.metrics.refused.inc()
            raise Overloaded(f"{self.pending} images pending, limit {self.limit}")
        self.pending += n
        self.metrics.queue_depth.set(self.pending)
        try:
            yield
        finally:
            self.pending -= n
            self.metrics.queue_depth.set(self.pending)


@dataclass
class _Queued(Generic[J, R]):
    job: J
    future: asyncio.Future[R] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Batcher(Generic[J, R]):
    def __init__(
        self,
        run: Callable[[list[J]], list[R]],
        admission: Admission,
        max_batch: int,
        max_wait_s: float,
        metrics: Metrics,
    ):
        self.run, self.admission, self.metrics = run, admission, metrics
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.queue: asyncio.Queue[_Queued[J, R]] = asyncio.Queue()
        self.running = 0  # jobs in the batch the worker is running now
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="batch")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.worker.shutdown(wait=True)

    async def submit(self, job: J) -> R:
        queued: _Queued[J, R] = _Queued(job)
        self.queue.put_nowait(queued)  # unbounded queue: admission already bounds what can be in it
        return await queued.future

    def _arriving(self) -> int:
        """Admitted images not yet queued (still in cache lookup or decode): worth waiting for."""
        return self.admission.pending - self.queue.qsize() - self.running

    async def _gather(self) -> list[_Queued[J, R]]:
        batch = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            timeout = deadline - loop.time()
            if timeout <= 0 or self._arriving() <= len(batch):  # nothing else on its way: go now
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), timeout))
            except TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            self.running = len(batch)
            self.metrics.batch_size.observe(len(batch))
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
                self.running = 0
