"""The launcher's audit: finds a gate whose count drifted from its holders, and repairs it.

The ledger closes every window a kill can open but one, on purpose: a worker killed
between a semaphore call and its ledger write (or between the un-record and the release)
loses that permit for good, and nothing else would notice. The audit does. For each gate
it reads the semaphore, its debt and cap record (credentials), and every live ledger's
slot for it, counts and operation counters. A gate that stood still across a whole
interval (the same reading twice, ``interval`` seconds apart) must satisfy

    free + held - debt == cap

(``ipc.caps``: for the global gate the debt is 0 and the cap its name's). If it does not,
the difference is drift: a live worker cannot sit between a semaphore call and its ledger
write for a whole interval, so permits are missing (released back) or extra (taken back,
owing a debt for any already handed out). Each repair is logged once and counted.

It never turns a correct count wrong: a reading that moved is not judged, and no gate is
judged while any ledger's owner is stopped (SIGSTOP, a debugger), the one way a live
worker could sit in that window; a stopped worker's gates are audited again once it runs.
The audit runs on the reaper's thread, a few times per interval after a reaping pass
(so it never races the reaper's own give-backs): a drift is repaired at most about
``interval * 1.25`` seconds after it appeared and the gate went quiet.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from pathlib import Path

import msgspec
import posix_ipc

from ipc.caps import GateView, repair_credential
from ipc.ledger import read_ledger
from ipc.naming import SHM_DIR, credential_gate_name, parse_gate_name, repairs_name

log = logging.getLogger("ipc.audit")


class GateReading(msgspec.Struct, frozen=True):
    """What one gate looked like at one instant; equal readings mean it stood still."""

    free: int
    debt: int
    cap: int  # applied: the cap the semaphores embody
    version: int
    held: tuple[tuple[str, int, int, int], ...]  # (ledger, slot, count, ops) per holding

    @property
    def drift(self) -> int:
        """Permits missing (> 0) or extra (< 0) against the cap."""
        held = sum(count for _, _, count, _ in self.held)
        return self.cap - (self.free + held - self.debt)


class Repair(msgspec.Struct, frozen=True):
    gate: str
    scope: str
    drift: int


class Audit:
    """Reads every gate on each ``run_once`` and repairs one whose reading has not moved
    for ``interval`` seconds and drifted; call it a few times per interval."""

    def __init__(self, namespace: str, *, interval: float = 2.0) -> None:
        self.namespace = namespace
        self.interval = interval
        self._reader = GateReader(namespace)
        self._seen: dict[str, tuple[GateReading, float]] = {}  # reading, unchanged since

    def run_once(self, now: float | None = None) -> list[Repair]:
        now = time.monotonic() if now is None else now
        readings, owners = self._reader.read()
        seen = self._seen
        self._seen = {}
        stopped = any(_stopped(pid) for pid in owners)
        repairs = []
        for gate, reading in readings.items():
            before = seen.get(gate)
            # A pass that sees a worker stopped counts as a change: the interval starts
            # again once every worker runs, so a worker stopped mid-admission has a whole
            # interval to write its ledger after SIGCONT.
            since = now
            if before is not None and before[0] == reading and not stopped:
                since = before[1]
            self._seen[gate] = (reading, since)
            if reading.drift == 0 or stopped or now - since < self.interval:
                continue
            repair = self._repair(gate, reading)
            if repair is not None:
                repairs.append(repair)
                del self._seen[gate]  # read afresh before it is judged again
        return repairs

    def _repair(self, gate: str, reading: GateReading) -> Repair | None:
        parsed = parse_gate_name(gate)
        if parsed is None:
            return None
        if parsed.scope == "credential":
            assert parsed.user_id is not None
            user, version = parsed.user_id, reading.version
            if not repair_credential(self.namespace, user, version, reading.drift):
                return None  # resized meanwhile: judged again next pass
        elif _repair_global(gate, reading.drift) == 0:
            return None  # it moved: judged again next pass
        count_repair(self.namespace, parsed.scope)
        log.warning(
            "cap drift repaired",
            extra={
                "gate": gate,
                "scope": parsed.scope,
                "drift": reading.drift,
                "action": (
                    f"released {reading.drift} missing permits"
                    if reading.drift > 0
                    else f"took back {-reading.drift} extra permits"
                ),
            },
        )
        return Repair(gate=gate, scope=parsed.scope, drift=reading.drift)


class GateReader:
    """Reads every gate of a namespace: one listing of /dev/shm per read, and the
    semaphores and records kept open across reads (a pass over thousands of credentials
    costs milliseconds, so the reaper that shares the thread is never late)."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._views: dict[uuid.UUID, GateView] = {}
        self._globals: dict[str, posix_ipc.Semaphore] = {}

    def read(self) -> tuple[dict[str, GateReading], set[int]]:
        """Every gate's reading, and the pids that own a ledger."""
        ns = self.namespace
        ledgers, records, globals_ = [], {}, []
        with os.scandir(SHM_DIR) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(f"{ns}.l."):
                    ledgers.append("/" + name)
                elif name.startswith(f"{ns}.k."):
                    with contextlib.suppress(ValueError, OSError):
                        records[uuid.UUID(hex=name[len(ns) + 3 :])] = entry.inode()
                elif name.startswith(f"sem.{ns}.g."):
                    globals_.append("/" + name[4:])
        held: dict[str, list[tuple[str, int, int, int]]] = {}
        owners = set()
        for ledger in ledgers:
            # Idle slots too: a slot back at count 0 whose operation counter moved is a
            # gate used between two readings, even when the counts came back.
            snapshot = read_ledger(ledger, with_idle=True)
            if snapshot is None:
                continue
            owners.add(snapshot.pid)
            for holding in snapshot.holdings:
                held.setdefault(holding.name, []).append(
                    (ledger, holding.slot, holding.count, holding.ops)
                )
        readings: dict[str, GateReading] = {}
        for name in globals_:
            parsed = parse_gate_name(name)
            sem = self._global(name)
            if parsed is None or parsed.cap is None or sem is None:
                continue
            readings[name] = GateReading(
                free=int(sem.value),
                debt=0,
                cap=parsed.cap,
                version=0,
                held=tuple(held.get(name, ())),
            )
        for user_id in list(self._views):
            if records.get(user_id) != self._views[user_id].inode:
                self._views.pop(user_id).close()  # gone, or made again: reopen
        for user_id, inode in records.items():
            view = self._views.get(user_id)
            if view is None:
                view = GateView.open(ns, user_id, inode)
                if view is None:
                    continue
                self._views[user_id] = view
            state = view.read()
            if state is None:
                continue  # deleted, or not finished by its creator
            version, cap, applied, free, debt = state
            if cap != applied:
                continue  # mid-resize: the cap sync finishes it first
            name = credential_gate_name(ns, user_id)
            readings[name] = GateReading(
                free=free, debt=debt, cap=applied, version=version, held=tuple(held.get(name, ()))
            )
        return readings, owners

    def _global(self, name: str) -> posix_ipc.Semaphore | None:
        sem = self._globals.get(name)
        if sem is None:
            try:
                sem = self._globals[name] = posix_ipc.Semaphore(name)
            except posix_ipc.ExistentialError:
                return None
        return sem

    def close(self) -> None:
        for view in self._views.values():
            view.close()
        for sem in self._globals.values():
            sem.close()
        self._views.clear()
        self._globals.clear()


def read_gates(namespace: str) -> tuple[dict[str, GateReading], set[int]]:
    """Every gate's reading, and the pids that own a ledger (a one-off read)."""
    reader = GateReader(namespace)
    try:
        return reader.read()
    finally:
        reader.close()


def count_repair(namespace: str, scope: str) -> None:
    sem = posix_ipc.Semaphore(repairs_name(namespace, scope), posix_ipc.O_CREAT, mode=0o600)
    try:
        sem.release()
    finally:
        sem.close()


def repairs_made(namespace: str) -> dict[str, int]:
    """Repairs since the launcher started, by scope."""
    return {
        scope: _value(repairs_name(namespace, scope)) or 0 for scope in ("global", "credential")
    }


def _repair_global(name: str, drift: int) -> int:
    """The permits given back (> 0) or taken back (< 0)."""
    sem = posix_ipc.Semaphore(name)
    done = 0
    try:
        for _ in range(drift):
            sem.release()
            done += 1
        for _ in range(-drift):
            sem.acquire(0)  # a quiet gate with extra permits has them free
            done -= 1
    except posix_ipc.BusyError:
        log.warning("gate %s moved while its drift was repaired", name)
    finally:
        sem.close()
    return done


def _value(name: str) -> int | None:
    try:
        sem = posix_ipc.Semaphore(name)
    except posix_ipc.ExistentialError:
        return None
    try:
        return int(sem.value)
    finally:
        sem.close()


def _stopped(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False  # gone: the reaper's business
    return stat[stat.rindex(b")") + 2 :][:1] in (b"T", b"t")

