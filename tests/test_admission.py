"""Admission at the door, synthetic and in-process: waiting requests are served in arrival order as room
frees, one that waits past its budget or finds too many waiting is refused, a waiter that leaves hands its
slot on, and parked connections get room only after the requests waiting at the door."""

from __future__ import annotations

import asyncio

import pytest

from service.core.batching import Admission, Overloaded, Upload
from service.metrics import Metrics


class Connection:
    def __init__(self, log: list[str], name: str, alive: bool = True):
        self.log, self.name, self.alive = log, name, alive

    def resume(self) -> bool:
        self.log.append(self.name)
        return self.alive


def test_waiters_get_room_in_arrival_order_and_past_their_budget_are_refused() -> None:
    async def run() -> tuple[list[int], str]:
        admission = Admission(2, Metrics(), max_wait_s=0.3, max_waiting=3)
        held = [await admission.upload(100) for _ in range(2)]  # full
        order: list[int] = []

        async def wait(i: int) -> Upload:
            upload = await admission.upload(100)
            order.append(i)
            return upload

        waiters = [asyncio.ensure_future(wait(i)) for i in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="3 waiting"):  # a fourth finds three waiting: refused at once
            await admission.upload(100)
        held[1].close()  # room for one: the first waiter
        first = await waiters[0]
        first.close()  # and the next
        await waiters[1]
        with pytest.raises(Overloaded) as late:  # the third waits past 0.3 s
            await waiters[2]
        return order, str(late.value)

    order, why = asyncio.run(run())
    assert order == [0, 1] and "waited 0.3 s" in why


def test_a_waiter_that_leaves_hands_its_slot_on() -> None:
    async def run() -> int:
        admission = Admission(1, Metrics(), max_wait_s=10, max_waiting=10)
        held = await admission.upload(1)
        leaving = asyncio.ensure_future(admission.upload(1))
        staying = asyncio.ensure_future(admission.upload(1))
        await asyncio.sleep(0)
        held.close()  # the slot goes to `leaving` ...
        leaving.cancel()  # ... which is cancelled before it runs: the slot goes on to `staying`
        upload = await asyncio.wait_for(staying, 1)
        upload.close()
        return admission.uploading

    assert asyncio.run(run()) == 0


def test_parked_connections_get_room_after_the_waiters_and_keep_it_reserved() -> None:
    async def run() -> tuple[list[str], int, int]:
        log: list[str] = []
        admission = Admission(2, Metrics(), max_wait_s=10, max_waiting=10)
        held = [await admission.upload(1) for _ in range(2)]
        assert admission.park(Connection(log, "gone", alive=False))
        assert admission.park(Connection(log, "a")) and admission.park(Connection(log, "b"))
        waiter = asyncio.ensure_future(admission.upload(1))
        await asyncio.sleep(0)
        held[0].close()  # one slot: to the waiter, not to a parked connection
        (await waiter).close()  # free again: the parked ones, oldest first ("gone" has gone)
        reserved = admission.reserved
        held[1].close()
        return log, reserved, admission.reserved

    log, reserved_after_one, reserved_after_two = asyncio.run(run())
    assert log == ["gone", "a", "b"] and (reserved_after_one, reserved_after_two) == (1, 2)


def test_a_connection_is_not_parked_while_there_is_room() -> None:
    async def run() -> bool:
        admission = Admission(2, Metrics(), max_wait_s=10, max_waiting=10)
        await admission.upload(1)
        return admission.park(Connection([], "x"))

    assert asyncio.run(run()) is False
