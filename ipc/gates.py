"""The gates a request passes: global then per credential, non-blocking, with permits.

A worker opens each semaphore once and keeps it (opening costs microseconds; a try plus
a release well under one). Permits are recorded in the worker's ledger after the
semaphore call succeeds and un-recorded before the release (see ``ipc.ledger``). A
credential's gate is resized in place when its cap changes (see ``ipc.caps``).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Literal, Protocol

import msgspec
import posix_ipc

from ipc.caps import CredentialGate, open_credential_gate
from ipc.errors import CredentialGone, LedgerFull, NamespaceMissing
from ipc.ledger import Ledger
from ipc.naming import generation_name, global_gate_name, waiting_room_name
from ipc.queue import Queue


class AnyGate(Protocol):
    name: str
    holders: int
    retired: bool

    def try_acquire(self) -> bool: ...

    def acquire_within(self, timeout: float) -> bool: ...

    def release(self) -> None: ...

    def close(self) -> None: ...


class Gate:
    """The global gate: one counting semaphore of ``cap`` permits shared by every worker."""

    __slots__ = ("_sem", "cap", "holders", "name", "retired")

    def __init__(self, name: str, cap: int, sem: posix_ipc.Semaphore) -> None:
        self.name = name
        self.cap = cap
        self._sem = sem
        self.holders = 0  # permits this worker holds on it
        self.retired = False  # closed once the last permit comes back

    def try_acquire(self) -> bool:
        try:
            self._sem.acquire(0)
        except posix_ipc.BusyError:
            return False
        return True

    def acquire_within(self, timeout: float) -> bool:
        """Blocking, for a waiting room's helper thread (the GIL is released while it
        waits): a permit within ``timeout`` seconds."""
        try:
            self._sem.acquire(timeout)
        except posix_ipc.BusyError:
            return False
        return True

    def release(self) -> None:
        self._sem.release()

    @property
    def free(self) -> int:
        return int(self._sem.value)

    def close(self) -> None:
        self._sem.close()


class Rejected(msgspec.Struct, frozen=True):
    scope: Literal["global", "credential"]
    cap: int
    # Seconds spent in a waiting line before the refusal; None when refused at once (no
    # queue, or its line was full).
    waited: float | None = None


class Permit:
    """What an admitted request holds; ``release`` gives everything back exactly once."""

    __slots__ = ("_gates", "_ledger", "released")

    def __init__(self, gates: tuple[AnyGate, ...], ledger: Ledger) -> None:
        self._gates = gates
        self._ledger = ledger
        self.released = False

    def release(self) -> bool:
        """Synchronous and idempotent: safe from any ``finally`` or callback."""
        if self.released:
            return False
        self.released = True
        for gate in reversed(self._gates):  # the credential's first, then the global one
            _give_back(gate, self._ledger)
        return True


def _recorded(gate: AnyGate, ledger: Ledger) -> None:
    """Write down a permit just acquired; if the ledger is full, release it unrecorded."""
    try:
        ledger.record(gate.name)
    except LedgerFull:
        gate.release()
        raise
    gate.holders += 1


def _retire(gate: AnyGate) -> None:
    gate.retired = True
    if not gate.holders:
        gate.close()


def _give_back(gate: AnyGate, ledger: Ledger) -> None:
    ledger.unrecord(gate.name)
    gate.release()
    gate.holders -= 1
    if gate.retired and not gate.holders:
        gate.close()


def _try(credential: CredentialGate) -> bool:
    """``try_acquire``; a gate closed under us (its user deleted meanwhile) is gone."""
    try:
        return credential.try_acquire()
    except posix_ipc.ExistentialError:
        raise CredentialGone(f"the gate of user {credential.user_id} was closed") from None


class Gatekeeper:
    """A worker's view of one namespace: its change counter, global gate and credential gates."""

    def __init__(self, namespace: str, *, global_cap: int | None, ledger: Ledger) -> None:
        self.namespace = namespace
        self.ledger = ledger
        try:
            self._generation = posix_ipc.Semaphore(generation_name(namespace))
        except posix_ipc.ExistentialError:
            raise NamespaceMissing(
                f"IPC namespace {namespace!r} is not set up: start the gateway with `gateway serve`"
            ) from None
        self.global_gate: Gate | None = None
        if global_cap is not None:
            name = global_gate_name(namespace, global_cap)
            try:
                sem = posix_ipc.Semaphore(name)
            except posix_ipc.ExistentialError:
                self._generation.close()
                raise NamespaceMissing(
                    f"global gate {name} is missing: the launcher was started with another "
                    "PROXY_MAX_GLOBAL_CONCURRENT"
                ) from None
            self.global_gate = Gate(name, global_cap, sem)
        self._credential_gates: dict[uuid.UUID, CredentialGate] = {}

    # The change counter: every settings change bumps it; every request compares it.

    def generation(self) -> int:
        return int(self._generation.value)

    def bump_generation(self) -> None:
        self._generation.release()

    # Credential gates.

    def credential_gate(self, user_id: uuid.UUID, cap_version: int, cap: int) -> CredentialGate:
        """The credential's gate, brought to ``cap`` if ``cap_version`` is newer than what
        this worker has seen applied (a no-op on every request but the first after a
        change)."""
        gate = self._credential_gates.get(user_id)
        if gate is None:
            gate = open_credential_gate(self.namespace, user_id, version=cap_version, cap=cap)
            self._credential_gates[user_id] = gate
        elif cap_version > gate.version:
            gate.apply(cap_version, cap)
        return gate

    def forget_credential_gates(self) -> None:
        """Close every credential gate (one with permits out closes when they come back)."""
        for gate in self._credential_gates.values():
            _retire(gate)
        self._credential_gates.clear()

    def drop_deleted_gates(self) -> None:
        """After a change anywhere: close the gates of deleted users (a gate's name never
        changes, so every other gate stays open; a cap change reaches it by version)."""
        for user_id, gate in list(self._credential_gates.items()):
            if gate.deleted:
                del self._credential_gates[user_id]
                _retire(gate)

    # Admission.

    def admit(self, credential: CredentialGate) -> Permit | Rejected:
        ledger = self.ledger
        global_gate = self.global_gate
        if global_gate is not None:
            if not global_gate.try_acquire():
                return Rejected(scope="global", cap=global_gate.cap)
            _recorded(global_gate, ledger)
        try:
            admitted = _try(credential)
        except BaseException:
            if global_gate is not None:
                _give_back(global_gate, ledger)
            raise
        if not admitted:
            if global_gate is not None:
                _give_back(global_gate, ledger)
            return Rejected(scope="credential", cap=credential.cap)
        try:
            _recorded(credential, ledger)
        except LedgerFull:
            if global_gate is not None:
                _give_back(global_gate, ledger)
            raise
        gates: tuple[AnyGate, ...] = (
            (credential,) if global_gate is None else (global_gate, credential)
        )
        return Permit(gates, ledger)

    def admit_unless_queued(self, credential: CredentialGate, queue: Queue) -> Permit | Rejected:
        """``admit``, but refused while anyone waits for either gate: a newcomer never
        barges past a line (the caller then waits in it)."""
        global_gate = self.global_gate
        if global_gate is not None and queue.crowded(
            waiting_room_name(self.namespace, None)
        ):
            return Rejected(scope="global", cap=global_gate.cap)
        if queue.crowded(waiting_room_name(self.namespace, credential.user_id)):
            return Rejected(scope="credential", cap=credential.cap)
        return self.admit(credential)

    async def admit_waiting(
        self, credential: CredentialGate, queue: Queue, *, within: float
    ) -> Permit | Rejected:
        """Admit, waiting up to ``within`` seconds in line for a gate over its cap.

        The global gate first, then the credential's; no global permit is held while
        waiting for the credential's (a burst on one credential must not starve everyone
        else of the global cap). Cancellation (the client left) gives back whatever was
        taken, and leaves any line at once.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        ledger = self.ledger
        global_gate = self.global_gate
        room = waiting_room_name(self.namespace, credential.user_id)
        global_room = waiting_room_name(self.namespace, None)

        def left() -> float:
            return max(0.0, within - (loop.time() - started))

        def rejected(
            scope: Literal["global", "credential"], cap: int, outcome: bool | None
        ) -> Rejected:
            waited = None if outcome is None else loop.time() - started  # None: line full
            return Rejected(scope=scope, cap=cap, waited=waited)

        async def take(gate: AnyGate, place: str) -> bool | None:
            """A permit of ``gate``, recorded: at once if nobody waits, else in line (None:
            the line is full)."""
            if not queue.crowded(place) and gate.try_acquire():
                _recorded(gate, ledger)
                return True
            return await queue.wait(gate, place, left())

        held: list[AnyGate] = []
        try:
            if global_gate is not None:
                if not (got := await take(global_gate, global_room)):
                    return rejected("global", global_gate.cap, got)
                held.append(global_gate)
            if not queue.crowded(room) and _try(credential):
                _recorded(credential, ledger)
                held.append(credential)
            else:
                if global_gate is not None:
                    _give_back(global_gate, ledger)
                    held.clear()
                if not (got := await queue.wait(credential, room, left())):
                    return rejected("credential", credential.cap, got)
                held.append(credential)
                if global_gate is not None:
                    # Holding the credential's own permit while it waits for the global
                    # one keeps only this credential's other requests waiting.
                    if not (got := await take(global_gate, global_room)):
                        return rejected("global", global_gate.cap, got)
                    held.insert(0, global_gate)
            permit = Permit(tuple(held), ledger)
            held.clear()  # the permit's now: not given back below
            return permit
        finally:
            for gate in reversed(held):
                _give_back(gate, ledger)

    def close(self) -> None:
        """Close every handle; one with permits still out closes when the last comes back."""
        self.forget_credential_gates()
        if self.global_gate is not None:
            self.global_gate.retired = True
            if not self.global_gate.holders:
                self.global_gate.close()
        self._generation.close()


def unlink_semaphore(name: str) -> bool:
    try:
        posix_ipc.unlink_semaphore(name)
    except posix_ipc.ExistentialError:
        return False
    return True
