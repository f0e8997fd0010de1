"""Micro-batching with back-pressure.

Admission counts the images a server has accepted and not yet answered, and the request bodies it holds;
past its limits a request waits at the door, before its body is read, for a bounded time, and is refused
(503) past that, so latency and memory stay bounded under overload. The batcher gathers queued jobs into one
batch (up to max_batch, waiting at most max_wait for images that are still on their way: in cache lookup)
and runs it in a worker thread, off the event loop, while the queue fills. At most `in_flight` batches run at
once: one where a batch keeps the cores busy, more where it mostly waits (a sharded memory's round trips to
its shards).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, NoReturn, Protocol, TypeVar

from service.errors import Overloaded
from service.metrics import Metrics

GAUGE_PERIOD_S = 0.1  # how often Admission's gauges are written: a scrape sees them at most this old
J = TypeVar("J")  # a job
R = TypeVar("R")  # its result


async def cancel(task: asyncio.Task[None] | None) -> None:
    """Stop a background loop (a task that runs until cancelled) and wait until it has."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Parked(Protocol):
    """A keep-alive connection not being read while the process is full (service/api/parking.py)."""

    def resume(self) -> bool:
        """Read again; False when the connection has gone meanwhile."""
        ...


class Admission:
    """What one server process has taken on, each request checked when it arrives, before its body is read:
    images admitted and not yet answered plus uploads still arriving (each at least one image) against
    `limit`, and the bytes of the request bodies held in memory against `max_bytes`.

    A request that finds the process full waits at the door, its body unread, first come first served, for
    at most `max_wait_s`; it is refused (Overloaded) when that time has passed or when `max_waiting` requests
    are waiting already. Waiting costs a future and a timer, and a request that waits is served without
    being retried: under a burst the process keeps its cores on the requests it admits instead of spending
    them on refusals that come straight back. Before that, a keep-alive connection whose answer has gone out
    while the process is full is parked: not read at all until there is room (its next request waits in the
    kernel, costing nothing here), then resumed with a slot kept for it until its next request's headers are
    in. Room goes to requests waiting at the door first, then to parked connections, oldest first.
    """

    def __init__(
        self, limit: int, metrics: Metrics, max_bytes: int = 1 << 62, max_wait_s: float = 0.0, max_waiting: int = 0
    ):
        self.limit, self.max_bytes, self.metrics = limit, max_bytes, metrics
        self.max_wait_s, self.max_waiting = max_wait_s, max_waiting
        self.pending = 0  # images admitted and not yet answered
        self.uploading = 0  # requests whose bodies are still arriving (upload(), below)
        self.bytes = 0  # body bytes held by requests in progress
        self.waiting = 0  # requests waiting at the door
        self._turns: deque[asyncio.Future[None]] = deque()  # theirs, oldest first (a done one has left)
        self.reserved = 0  # slots kept for resumed connections until their next request's headers are in
        self._parked: deque[Parked] = deque()

    def report(self) -> None:
        """Write the gauges of what the process has taken on (rac_queue_depth, rac_uploads). The pipeline does
        it every GAUGE_PERIOD_S: at every change it would be four writes to the metrics file a request."""
        self.metrics.queue_depth.set(self.pending)
        self.metrics.uploads.set(self.uploading)

    def _refuse(self, why: str) -> NoReturn:
        self.metrics.refused.inc()
        raise Overloaded(why)

    def _full(self, n: int = 1) -> bool:
        return self.pending + self.uploading + self.reserved + n > self.limit

    def _why(self) -> str:
        return f"{self.pending} images pending and {self.uploading} arriving, limit {self.limit}"

    def admit(self, n: int) -> Admitted:
        """n images whose bodies are in, held for a `with` block: the upload's own slot was given back when its
        body arrived. Raises Overloaded."""
        return Admitted(self, n)

    async def upload(self, declared: int | None) -> Upload:
        """A request at the door: it holds one image slot until its body has arrived, and its body's bytes
        until it is answered (its Content-Length, or counted as they arrive when it has none). Waits for a
        slot as the class says; raises Overloaded. Close it."""
        if self.waiting or self._full():  # nobody overtakes a request that waits
            await self._wait()
        else:
            self.uploading += 1
        upload = Upload(self)
        try:
            upload.received(declared or 0)
        except Overloaded:
            upload.close()
            raise
        return upload

    async def _wait(self) -> None:
        """Until _wake hands this request a slot (counted in `uploading` for it), or Overloaded."""
        if self.waiting >= self.max_waiting or self.max_wait_s <= 0:
            self._refuse(f"{self._why()}, {self.waiting} waiting")
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
        self._turns.append(turn)
        self.waiting += 1
        self.metrics.waiting.set(self.waiting)
        timer = loop.call_later(self.max_wait_s, _expire, turn)
        try:
            await turn
        except Overloaded:
            self._refuse(f"waited {self.max_wait_s:g} s for a slot: {self._why()}, {self.waiting} waiting")
        except asyncio.CancelledError:  # the caller went away; a slot handed over meanwhile goes to the next
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self.uploading -= 1
                self._wake()
            raise
        finally:
            timer.cancel()
            self.waiting -= 1
            self.metrics.waiting.set(self.waiting)

    def _wake(self) -> None:
        """Hand free slots to the requests waiting longest, then to the connections parked longest."""
        while self._turns and not self._full():
            turn = self._turns.popleft()
            if not turn.done():  # else it timed out or went away
                self.uploading += 1
                turn.set_result(None)
        while self._turns and self._turns[0].done():  # those that left, at the front
            self._turns.popleft()
        while self._parked and not self.waiting and not self._full():
            if self._parked.popleft().resume():
                self.reserved += 1

    def park(self, connection: Parked) -> bool:
        """A keep-alive connection whose answer has gone out: True when the process is full, and it is to stop
        reading until `connection.resume()` is called."""
        if not self.waiting and not self._full():
            return False
        self._parked.append(connection)
        return True

    def unreserve(self, upload: bool) -> None:
        """A resumed connection's next request has its headers in, or the connection went: its slot is free.
        An upload takes it at the door; otherwise the next in line does (on the loop's next turn, after the
        tasks of the requests read in this one)."""
        self.reserved -= 1
        if not upload:
            asyncio.get_running_loop().call_soon(self._wake)


# The `with` blocks every request enters are classes: a generator's context manager costs about 1.6 µs more
# each on these cores.


class Admitted:
    __slots__ = ("admission", "n")

    def __init__(self, admission: Admission, n: int):
        if admission._full(n):
            admission._refuse(admission._why())
        admission.pending += n
        self.admission, self.n = admission, n

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        self.admission.pending -= self.n
        self.admission._wake()


class Coming:
    __slots__ = ("batcher",)

    def __init__(self, batcher: Batcher[Any, Any]):
        self.batcher = batcher
        batcher.arriving += 1

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        self.batcher.arriving -= 1
        if self.batcher.arriving == 0:
            self.batcher._wakeup()  # a batch waiting for it goes now


def _expire(turn: asyncio.Future[None]) -> None:
    if not turn.done():
        turn.set_exception(Overloaded("waited too long"))


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
        """The body is in (or the client left): give the image slot back, to be taken by admit(). A waiting
        request is handed it on the next turn of the loop if admit() did not take it meanwhile (a request
        that fails before it reaches the pipeline)."""
        if self.arriving:
            self.arriving = False
            self.admission.uploading -= 1
            if self.admission.waiting:
                asyncio.get_running_loop().call_soon(self.admission._wake)

    def close(self) -> None:
        if self.arriving:
            self.arriving = False
            self.admission.uploading -= 1
            self.admission._wake()
        self.admission.bytes -= self.bytes
        self.bytes = 0


class _Queued(Generic[J, R]):
    __slots__ = ("future", "job")

    def __init__(self, job: J, future: asyncio.Future[R]):
        self.job, self.future = job, future


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
        self.queue: deque[_Queued[J, R]] = deque()  # unbounded: admission already bounds what can be in it
        self.arriving = 0  # jobs on their way: in cache lookup, not yet submitted
        self._wake: asyncio.Future[None] | None = None  # set while a batch waits for its first job, or for more
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
        queued: _Queued[J, R] = _Queued(job, asyncio.get_running_loop().create_future())
        self.queue.append(queued)
        self._wakeup()
        return await queued.future

    def _wakeup(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def coming(self) -> Coming:
        """Around a job's preparation (its cache lookup), a `with` block: while it is on its way, a batch being
        gathered may wait for it; once it is submitted, answered or failed, nobody waits for it."""
        return Coming(self)

    async def _gather(self) -> list[_Queued[J, R]]:
        loop = asyncio.get_running_loop()
        while not self.queue:  # wait for the first job
            await self._wait(None)
        batch = [self.queue.popleft()]
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if self.queue:
                batch.append(self.queue.popleft())
                continue
            if self.arriving == 0 or loop.time() >= deadline:  # nothing else on its way, or no more time
                break
            await self._wait(deadline)  # for the next job, the last one on its way, or the deadline
        return batch

    async def _wait(self, deadline: float | None) -> None:
        """Until submit() or the last job on its way wakes it, or the deadline (one future and one timer:
        asyncio.wait_for would make a task per wait)."""
        loop = asyncio.get_running_loop()
        self._wake = loop.create_future()
        timer = None if deadline is None else loop.call_at(deadline, self._wakeup)
        try:
            await self._wake
        finally:
            if timer is not None:
                timer.cancel()
            self._wake = None

    async def _loop(self) -> None:
        while True:
            await self.slots.acquire()  # before gathering: with one slot, a batch gathers once the last is done
            batch = await self._gather()
            self.metrics.batch_size.observe(len(batch))
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _timed(self, jobs: list[J]) -> list[R]:
        """One batch in the worker thread, its CPU time counted (the thread's own: nothing else runs in it)."""
        cpu = time.thread_time()
        try:
            return self.run(jobs)
        finally:
            self.metrics.batch_cpu.inc(time.thread_time() - cpu)

    async def _run(self, batch: list[_Queued[J, R]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self.worker, self._timed, [q.job for q in batch])
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
