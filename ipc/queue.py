"""Waiting for a slot: first come, first served across workers, without blocking the loop.

Off by default (``GATEWAY_QUEUE_TIMEOUT=0``). When on, a request over a cap waits in a
line for that gate instead of getting an instant 429:

- **One helper thread per gate per worker with waiters** blocks in ``sem_timedwait``
  (posix_ipc releases the GIL) and hands each permit it takes to the oldest waiter of its
  worker, on the event loop's thread, which records it in the ledger before anyone can see
  it. A kill between the two errs towards a lost permit (the audit restores it), never
  towards an over-release. The thread takes a permit only while more local waiters wait
  than permits are on their way to them, and ends when its worker has no waiter left.
- **Across workers** the kernel wakes blocked ``sem_timedwait`` callers first come, first
  served, and nobody barges: while anyone waits for a gate (in any worker), a new request
  for it joins the line instead of trying the semaphore. So workers are served in turn,
  each in arrival order; the test suite measures how close to FIFO that is.
- **A waiting room per gate** bounds the line: a semaphore whose value is the free places
  (``GATEWAY_QUEUE_MAX_WAITERS``); a request finding it full is refused at once, as
  without a queue. Places are recorded in the worker's ledger like permits, so the reaper
  frees the places of a worker killed with waiters.
- **Leaving**: a waiter whose client goes, or whose time is up, leaves at once; a permit
  that arrives for a waiter that has just gone passes to the next one, or back to the
  semaphore: never lost, never doubled.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Callable
from typing import Final, Protocol

import posix_ipc

from ipc.errors import LedgerFull
from ipc.ledger import Ledger

# Longest a helper thread blocks at once; it then looks whether anyone still waits.
_SLICE: Final = 0.25


class WaitableGate(Protocol):
    name: str
    holders: int
    retired: bool

    def try_acquire(self) -> bool: ...

    def acquire_within(self, timeout: float) -> bool: ...

    def release(self) -> None: ...

    def close(self) -> None: ...


class Place:
    """One gate's waiting room, shared by every worker: ``capacity`` places."""

    __slots__ = ("_sem", "capacity", "name")

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.capacity = capacity
        self._sem = posix_ipc.Semaphore(
            name, posix_ipc.O_CREAT, mode=0o600, initial_value=capacity
        )

    def waiting(self) -> int:
        """Requests waiting for the gate across all workers (never negative)."""
        return max(0, self.capacity - int(self._sem.value))

    def take(self) -> bool:
        try:
            self._sem.acquire(0)
        except posix_ipc.BusyError:
            return False
        return True

    def give(self) -> None:
        self._sem.release()

    def close(self) -> None:
        self._sem.close()


class WaitingRoom:
    """One gate's line in this worker, served by at most one helper thread."""

    def __init__(
        self,
        gate: WaitableGate,
        place: Place,
        ledger: Ledger,
        loop: asyncio.AbstractEventLoop,
        on_idle: Callable[[WaitingRoom], None],
    ) -> None:
        self.gate = gate
        self.place = place
        self._ledger = ledger
        self._loop = loop
        self._on_idle = on_idle
        self._line: collections.deque[asyncio.Future[bool]] = collections.deque()
        # What the helper thread reads: waiters in the line, and permits it took that the
        # loop has not handed over yet. It takes one only while the first exceeds the second.
        self._changed = threading.Condition()
        self._wanted = 0
        self._on_the_way = 0
        self._thread: threading.Thread | None = None
        self._stopping = False

    def crowded(self) -> bool:
        """Someone, in any worker, waits for this gate: a newcomer must queue behind."""
        return self.place.waiting() > 0

    async def wait(self, within: float) -> bool:
        """Wait up to ``within`` seconds; True with a permit of the gate recorded in the
        ledger (the caller's to release), False when the time is up. Cancellation leaves
        the line at once and keeps no permit."""
        future: asyncio.Future[bool] = self._loop.create_future()
        self._line.append(future)
        self._add_wanted(1)
        self._start_thread()
        try:
            return await asyncio.wait_for(asyncio.shield(future), within)
        except TimeoutError:
            return self._leave(future)
        except asyncio.CancelledError:
            if self._leave(future):
                # It arrived as we left: to the next waiter, or back to the gate.
                self._ledger.unrecord(self.gate.name)
                self.gate.holders -= 1
                self._pass_on()
            raise

    def _leave(self, future: asyncio.Future[bool]) -> bool:
        """Out of the line; whether a permit reached it first."""
        if future.done() and not future.cancelled():
            return future.result()
        future.cancel()
        with contextlib.suppress(ValueError):
            self._line.remove(future)
        self._add_wanted(-1)
        return False

    def _add_wanted(self, delta: int) -> None:
        with self._changed:
            self._wanted += delta
            self._changed.notify()

    # -- the helper thread -----------------------------------------------------------

    def _start_thread(self) -> None:
        if self._thread is not None:
            return
        self.gate.holders += 1  # the gate stays open while the thread may block on it
        self._thread = threading.Thread(
            target=self._serve, name=f"wait-{self.gate.name}", daemon=True
        )
        self._thread.start()

    def _serve(self) -> None:
        while True:
            with self._changed:
                while not self._stopping and 0 < self._wanted <= self._on_the_way:
                    self._changed.wait(_SLICE)  # a permit is on its way to every waiter
                if self._stopping or self._wanted <= 0:
                    break
            if not self.gate.acquire_within(_SLICE):
                continue
            with self._changed:
                if self._wanted <= self._on_the_way:
                    # Its waiter left while the thread was blocked: straight back, from
                    # here, without a round trip through the loop.
                    self.gate.release()
                    continue
                self._on_the_way += 1
            try:
                self._loop.call_soon_threadsafe(self._delivered)
            except RuntimeError:  # the loop is closed: the worker is going down
                self.gate.release()
                return
        try:
            self._loop.call_soon_threadsafe(self._thread_ended)
        except RuntimeError:
            return

    def _delivered(self) -> None:
        with self._changed:
            self._on_the_way -= 1
            self._changed.notify()
        self._pass_on()

    def _pass_on(self) -> None:
        """On the loop: a permit goes to the oldest waiter still here, recorded before it
        is seen; with nobody left, back to the semaphore."""
        while self._line:
            future = self._line.popleft()
            if future.done():
                continue  # gone already
            try:
                self._ledger.record(self.gate.name)
            except LedgerFull as exc:
                self.gate.release()
                future.set_exception(exc)
            else:
                self.gate.holders += 1
                future.set_result(True)
            self._add_wanted(-1)
            return
        self.gate.release()

    def _thread_ended(self) -> None:
        self._thread = None
        self.gate.holders -= 1
        if self.gate.retired and not self.gate.holders:
            self.gate.close()
        if self._line:
            self._start_thread()  # someone joined as it ended
        else:
            self._on_idle(self)

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify()


class Queue:
    """A worker's waiting rooms, one per gate that has waiters here."""

    def __init__(self, namespace: str, ledger: Ledger, *, max_waiters: int) -> None:
        self.namespace = namespace
        self.ledger = ledger
        self.max_waiters = max_waiters
        self._rooms: dict[str, WaitingRoom] = {}
        self._places: dict[str, Place] = {}

    def place(self, name: str) -> Place:
        place = self._places.get(name)
        if place is None:
            place = self._places[name] = Place(name, self.max_waiters)
        return place

    def crowded(self, place_name: str) -> bool:
        return self.place(place_name).waiting() > 0

    async def wait(self, gate: WaitableGate, place_name: str, within: float) -> bool | None:
        """Wait in ``gate``'s line; True with a permit recorded, False when the time is up,
        None when the line is full (refused at once)."""
        place = self.place(place_name)
        if not place.take():
            return None
        try:
            self.ledger.record(place.name)  # a killed worker's places come back too
        except LedgerFull:
            place.give()
            raise
        try:
            room = self._rooms.get(gate.name)
            if room is None or room.gate is not gate:
                # (A gate reopened after a change gets a room of its own; the old one's
                # thread ends with its last waiter.)
                room = WaitingRoom(
                    gate, place, self.ledger, asyncio.get_running_loop(), self._idle
                )
                self._rooms[gate.name] = room
            return await room.wait(within)
        finally:
            self.ledger.unrecord(place.name)
            place.give()

    def waiting(self) -> dict[str, int]:
        """Waiters per waiting room in this worker's view (every worker's, from the rooms)."""
        return {name: place.waiting() for name, place in self._places.items()}

    def _idle(self, room: WaitingRoom) -> None:
        if self._rooms.get(room.gate.name) is room:
            del self._rooms[room.gate.name]

    def close(self) -> None:
        for room in self._rooms.values():
            room.stop()
        for place in self._places.values():
            place.close()
        self._places.clear()
