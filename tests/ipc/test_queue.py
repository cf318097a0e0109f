"""Waiting for a slot: lines per gate, helper threads, timeouts, leaving, places."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import pytest

from ipc.gates import Gatekeeper, Permit, Rejected
from ipc.naming import waiting_room_name
from ipc.queue import Queue
from tests.ipc.conftest import GLOBAL_CAP, OtherProcess, sem_value


@pytest.fixture
def queue(gatekeeper: Gatekeeper) -> Queue:
    made = Queue(gatekeeper.namespace, gatekeeper.ledger, max_waiters=4)
    yield made
    made.close()


async def wait_until(check: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def held(gatekeeper: Gatekeeper) -> dict[str, int]:
    """This worker's ledger without the waiting rooms' places."""
    return {k: v for k, v in gatekeeper.ledger.held().items() if ".q." not in k}


async def test_a_waiter_gets_the_slot_another_process_frees(
    gatekeeper: Gatekeeper, queue: Queue, spawn: Callable[..., OtherProcess]
) -> None:
    user = uuid.uuid4()
    other = spawn()
    assert other.admit(user, 1, 1) == {"admitted": True}
    gate = gatekeeper.credential_gate(user, 1, 1)
    waiting = asyncio.create_task(gatekeeper.admit_waiting(gate, queue, within=10))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    assert queue.place(waiting_room_name(gatekeeper.namespace, user)).waiting() == 1
    # While it waits for the credential it holds no global permit.
    assert gatekeeper.global_gate is not None
    assert gatekeeper.global_gate.free == GLOBAL_CAP - 1
    freed = time.monotonic()
    assert other.request("release") is True
    permit = await waiting
    latency = time.monotonic() - freed
    assert isinstance(permit, Permit)
    assert held(gatekeeper) == {gatekeeper.global_gate.name: 1, gate.name: 1}
    assert queue.place(waiting_room_name(gatekeeper.namespace, user)).waiting() == 0
    permit.release()
    assert held(gatekeeper) == {}
    print(f"slot freed in another process reached the waiter in {latency * 1000:.2f} ms")


async def test_a_waiter_whose_time_is_up_takes_nothing(
    gatekeeper: Gatekeeper, queue: Queue
) -> None:
    user = uuid.uuid4()
    gate = gatekeeper.credential_gate(user, 1, 1)
    first = gatekeeper.admit(gate)
    assert isinstance(first, Permit)
    refused = await gatekeeper.admit_waiting(gate, queue, within=0.3)
    assert isinstance(refused, Rejected)
    assert (refused.scope, refused.cap) == ("credential", 1)
    assert 0.3 <= refused.waited < 2
    assert held(gatekeeper) == {gatekeeper.global_gate.name: 1, gate.name: 1}  # type: ignore[union-attr]
    first.release()
    # (A helper thread still blocked when its waiter left gives a permit it then takes
    # straight back.)
    await wait_until(lambda: gate.free == 1)
    assert queue.place(waiting_room_name(gatekeeper.namespace, user)).waiting() == 0


async def test_a_waiter_that_leaves_passes_its_turn_on(
    gatekeeper: Gatekeeper, queue: Queue
) -> None:
    user = uuid.uuid4()
    gate = gatekeeper.credential_gate(user, 1, 1)
    first = gatekeeper.admit(gate)
    assert isinstance(first, Permit)
    leaving = asyncio.create_task(gatekeeper.admit_waiting(gate, queue, within=10))
    await asyncio.sleep(0.05)
    staying = asyncio.create_task(gatekeeper.admit_waiting(gate, queue, within=10))
    await asyncio.sleep(0.05)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    first.release()
    second = await staying
    assert isinstance(second, Permit)
    assert gate.free == 0
    second.release()
    await wait_until(lambda: gate.free == 1)
    assert held(gatekeeper) == {}


async def test_a_permit_arriving_as_its_waiter_leaves_is_not_lost(
    gatekeeper: Gatekeeper, queue: Queue
) -> None:
    user = uuid.uuid4()
    gate = gatekeeper.credential_gate(user, 1, 1)
    for _ in range(20):
        first = gatekeeper.admit(gate)
        assert isinstance(first, Permit)
        waiting = asyncio.create_task(gatekeeper.admit_waiting(gate, queue, within=10))
        await asyncio.sleep(0.01)
        first.release()
        await asyncio.sleep(0)  # the helper thread may take it now, or not yet
        waiting.cancel()
        try:
            result = await waiting
        except asyncio.CancelledError:
            pass
        else:
            assert isinstance(result, Permit)
            result.release()
        await wait_until(lambda: gate.free == 1)  # not lost; and never 2: not doubled
        assert gate.free == 1
        assert held(gatekeeper) == {}


async def test_a_full_line_refuses_at_once(gatekeeper: Gatekeeper, queue: Queue) -> None:
    user = uuid.uuid4()
    gate = gatekeeper.credential_gate(user, 1, 1)
    first = gatekeeper.admit(gate)
    assert isinstance(first, Permit)
    waiters = [
        asyncio.create_task(gatekeeper.admit_waiting(gate, queue, within=10)) for _ in range(4)
    ]
    await asyncio.sleep(0.1)
    started = time.monotonic()
    refused = await gatekeeper.admit_waiting(gate, queue, within=10)
    assert isinstance(refused, Rejected) and refused.scope == "credential"
    assert time.monotonic() - started < 1
    order = []
    first.release()
    for task in waiters:
        permit = await task
        assert isinstance(permit, Permit)
        order.append(waiters.index(task))
        permit.release()
    await wait_until(lambda: gate.free == 1)
    assert held(gatekeeper) == {}


async def test_waiters_in_one_worker_are_served_in_arrival_order(
    gatekeeper: Gatekeeper, queue: Queue
) -> None:
    user = uuid.uuid4()
    gate = gatekeeper.credential_gate(user, 1, 1)
    first = gatekeeper.admit(gate)
    assert isinstance(first, Permit)
    admitted: list[int] = []

    async def waiter(index: int) -> None:
        permit = await gatekeeper.admit_waiting(gate, queue, within=10)
        assert isinstance(permit, Permit)
        admitted.append(index)
        await asyncio.sleep(0.01)
        permit.release()

    tasks = []
    for index in range(4):
        tasks.append(asyncio.create_task(waiter(index)))
        await asyncio.sleep(0.01)
    first.release()
    await asyncio.gather(*tasks)
    assert admitted == [0, 1, 2, 3]


async def test_the_global_line_then_the_credential(
    gatekeeper: Gatekeeper, queue: Queue, spawn: Callable[..., OtherProcess]
) -> None:
    other = spawn()
    for _ in range(GLOBAL_CAP):
        assert other.admit(uuid.uuid4(), 1, 1) == {"admitted": True}
    gate = gatekeeper.credential_gate(uuid.uuid4(), 1, 2)
    waiting = asyncio.create_task(gatekeeper.admit_waiting(gate, queue, within=10))
    await asyncio.sleep(0.1)
    assert queue.place(waiting_room_name(gatekeeper.namespace, None)).waiting() == 1
    assert other.request("release") is True
    permit = await waiting
    assert isinstance(permit, Permit)
    assert sem_value(gatekeeper.global_gate.name) == 0  # type: ignore[union-attr]
    permit.release()
    assert held(gatekeeper) == {}
