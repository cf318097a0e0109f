"""A worker's ledger: the permits it holds, in POSIX shared memory that only it writes.

POSIX semaphores have no undo: a worker killed while holding permits keeps them forever.
So each worker writes down, per semaphore name, how many permits it holds; the
launcher's reaper reads the ledger of a worker that died and gives those permits back.

Layout: a header (magic, pid, process start time, slot count), then fixed slots of
(count: int64, operations: int64, name: 112 bytes, NUL-padded). A slot's operation
counter grows with every record and un-record of its gate, so the launcher's audit can
tell a gate that stood still across an interval from one whose count merely came back to
where it was (``ipc.audit``). Only the owning worker writes while it lives; the reaper
writes only once the owner is dead.

Ordering (see ``Permit``): a permit is recorded after the semaphore call succeeded and
un-recorded before it is released. A kill between the two errs towards one permit lost
from that semaphore, never towards an over-release.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
from collections import deque
from collections.abc import Iterator
from typing import Final

import msgspec
import posix_ipc

from ipc.errors import LedgerFull
from ipc.naming import ledger_name

_MAGIC: Final = b"GWLEDG02"
_HEADER: Final = struct.Struct("<8sqqq")  # magic, pid, start time, slots
_COUNT: Final = struct.Struct("<q")
_SLOT: Final = struct.Struct("<qq")  # count, operations
_NAME_AT: Final = _SLOT.size
_NAME_BYTES: Final = 112
_SLOT_BYTES: Final = _SLOT.size + _NAME_BYTES
DEFAULT_SLOTS: Final = 4096


class Holding(msgspec.Struct, frozen=True):
    slot: int
    name: str
    count: int
    ops: int = 0


class LedgerSnapshot(msgspec.Struct, frozen=True):
    ledger: str
    pid: int
    start_time: int
    holdings: list[Holding]


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot); None if it is gone or a zombie.

    Pids are reused, so a ledger is matched to its process by pid *and* start time.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


class Ledger:
    """The ledger of the current process. Not thread-safe: one event loop writes it."""

    def __init__(self, namespace: str, *, slots: int = DEFAULT_SLOTS) -> None:
        self.pid = os.getpid()
        self.name = ledger_name(namespace, self.pid)
        start = process_start_time(self.pid)
        if start is None:  # pragma: no cover - /proc is always there on Linux
            raise RuntimeError("cannot read this process's start time from /proc")
        size = _HEADER.size + slots * _SLOT_BYTES
        # O_CREAT without O_EXCL: a ledger under our pid was left by a dead process that
        # had the same pid. Its permits are given back (under the ledger's lock, so the
        # reaper cannot do it twice) before we take the name over.
        shm = posix_ipc.SharedMemory(self.name, posix_ipc.O_CREAT, mode=0o600)
        try:
            fcntl.flock(shm.fd, fcntl.LOCK_EX)
            existing = shm.size
            if existing >= _HEADER.size:
                with mmap.mmap(shm.fd, existing) as old:
                    header = _header(old, existing)
                    if header is not None and header[1] != start:
                        _give_back(old, header[2])
            os.ftruncate(shm.fd, size)
            self._map = mmap.mmap(shm.fd, size)
            self._map[:] = bytes(size)
            _HEADER.pack_into(self._map, 0, _MAGIC, self.pid, start, slots)
        finally:
            shm.close_fd()  # also drops the lock
        self._slots = slots
        self._slot_of: dict[str, int] = {}
        self._counts: dict[str, int] = {}
        self._ops = [0] * slots
        # Oldest freed first: a slot keeps naming its last gate (with its operation
        # counter) as long as possible, so the audit sees that gate was used.
        self._free: deque[int] = deque(range(slots))

    def record(self, name: str) -> None:
        count = self._counts.get(name, 0) + 1
        slot = self._slot_of.get(name)
        if slot is None:
            if not self._free:
                raise LedgerFull(f"ledger {self.name} has no free slot for {name}")
            slot = self._free.popleft()
            self._slot_of[name] = slot
            offset = _HEADER.size + slot * _SLOT_BYTES + _NAME_AT
            self._map[offset : offset + _NAME_BYTES] = name.encode().ljust(_NAME_BYTES, b"\0")
        self._counts[name] = count
        ops = self._ops[slot] = self._ops[slot] + 1
        _SLOT.pack_into(self._map, _HEADER.size + slot * _SLOT_BYTES, count, ops)

    def unrecord(self, name: str) -> None:
        count = self._counts[name] - 1
        slot = self._slot_of[name]
        ops = self._ops[slot] = self._ops[slot] + 1
        _SLOT.pack_into(self._map, _HEADER.size + slot * _SLOT_BYTES, count, ops)
        if count:
            self._counts[name] = count
        else:
            # The slot keeps its name with count 0 until reused: the reaper skips it.
            del self._counts[name]
            del self._slot_of[name]
            self._free.append(slot)

    def held(self) -> dict[str, int]:
        return dict(self._counts)

    def close(self) -> None:
        """Unmap; remove the ledger only when nothing is held (else the reaper needs it)."""
        if self._map.closed:
            return
        empty = not self._counts
        self._map.close()
        if empty:
            unlink_ledger(self.name)


def read_ledger(
    name: str, *, with_holdings: bool = True, with_idle: bool = False
) -> LedgerSnapshot | None:
    """Read a ledger by name; None when it is gone or not a ledger. ``with_idle`` also
    lists slots at count 0 that still name a gate (their operation counters moved if the
    gate was used since)."""
    with _mapped(name, locked=False) as found:
        if found is None:
            return None
        view, (pid, start, slots) = found
        holdings = list(_holdings(view, slots, idle=with_idle)) if with_holdings else []
    return LedgerSnapshot(ledger=name, pid=pid, start_time=start, holdings=holdings)


def drain_dead_ledger(name: str) -> dict[str, int] | None:
    """If the ledger's process is dead, give back every permit it records and remove it.

    Returns the permits given back per semaphore, or None when the ledger is gone or its
    process lives. Runs under the ledger's lock and re-checks the owner under it, so a
    new process that took over the pid (and the ledger) is never mistaken for the dead one.
    """
    with _mapped(name, locked=True) as found:
        if found is None:
            return None
        view, (pid, start, slots) = found
        if process_start_time(pid) == start:
            return None
        returned = _give_back(view, slots)
        unlink_ledger(name)  # still under the lock: no one drains it twice
    return returned


@contextlib.contextmanager
def _mapped(
    name: str, *, locked: bool
) -> Iterator[tuple[mmap.mmap, tuple[int, int, int]] | None]:
    """The ledger mapped with its header (pid, start time, slots); None if not a ledger."""
    try:
        shm = posix_ipc.SharedMemory(name)
    except posix_ipc.ExistentialError:
        yield None
        return
    try:
        if locked:
            fcntl.flock(shm.fd, fcntl.LOCK_EX)  # released when the fd closes
        size = shm.size  # read before close_fd: size fails afterwards
        if size < _HEADER.size:
            yield None
            return
        with mmap.mmap(shm.fd, size) as view:
            header = _header(view, size)
            yield None if header is None else (view, header)
    finally:
        shm.close_fd()


def _header(view: mmap.mmap, size: int) -> tuple[int, int, int] | None:
    magic, pid, start, slots = _HEADER.unpack_from(view, 0)
    if magic != _MAGIC or size < _HEADER.size + slots * _SLOT_BYTES:
        return None
    return pid, start, slots


def _give_back(view: mmap.mmap, slots: int) -> dict[str, int]:
    returned: dict[str, int] = {}
    for holding in list(_holdings(view, slots)):
        offset = _HEADER.size + holding.slot * _SLOT_BYTES
        try:
            # No O_CREAT: a name unlinked by a cap change must stay gone.
            sem = posix_ipc.Semaphore(holding.name)
        except posix_ipc.ExistentialError:
            _COUNT.pack_into(view, offset, 0)
            continue
        try:
            for left in range(holding.count - 1, -1, -1):
                # Un-record before releasing, as a worker does: a kill half-way errs
                # towards a lost permit, never an over-release.
                _COUNT.pack_into(view, offset, left)
                sem.release()
                returned[holding.name] = returned.get(holding.name, 0) + 1
        finally:
            sem.close()
    return returned


def unlink_ledger(name: str) -> None:
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory(name)


_SLOT_COUNTS: Final = struct.Struct(f"<qq{_NAME_BYTES}x")  # a whole slot, name skipped


def _holdings(view: mmap.mmap, slots: int, *, idle: bool = False) -> Iterator[Holding]:
    # iter_unpack walks every slot in C: the audit reads all ledgers a few times a second.
    table = view[_HEADER.size : _HEADER.size + slots * _SLOT_BYTES]
    for slot, (count, ops) in enumerate(_SLOT_COUNTS.iter_unpack(table)):
        if count > 0 or (idle and ops > 0):
            offset = _HEADER.size + slot * _SLOT_BYTES
            raw = view[offset + _NAME_AT : offset + _SLOT_BYTES].rstrip(b"\0")
            yield Holding(slot=slot, name=raw.decode(), count=count, ops=ops)
