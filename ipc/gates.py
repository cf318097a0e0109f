"""The gates a request passes: global then per credential, non-blocking, with permits.

A worker opens each semaphore once and keeps it (opening costs microseconds; a try plus
a release well under one). Permits are recorded in the worker's ledger after the
semaphore call succeeds and un-recorded before the release (see ``ipc.ledger``).
"""

from __future__ import annotations

import uuid
from typing import Literal

import msgspec
import posix_ipc

from ipc.errors import LedgerFull, NamespaceMissing
from ipc.ledger import Ledger
from ipc.naming import credential_gate_name, generation_name, global_gate_name


class Gate:
    """One counting semaphore: ``cap`` permits shared by every worker."""

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


class Permit:
    """What an admitted request holds; ``release`` gives everything back exactly once."""

    __slots__ = ("_gates", "_ledger", "released")

    def __init__(self, gates: tuple[Gate, ...], ledger: Ledger) -> None:
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


def _recorded(gate: Gate, ledger: Ledger) -> None:
    """Write down a permit just acquired; if the ledger is full, release it unrecorded."""
    try:
        ledger.record(gate.name)
    except LedgerFull:
        gate.release()
        raise
    gate.holders += 1


def _give_back(gate: Gate, ledger: Ledger) -> None:
    ledger.unrecord(gate.name)
    gate.release()
    gate.holders -= 1
    if gate.retired and not gate.holders:
        gate.close()


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
        self._credential_gates: dict[str, Gate] = {}

    # The change counter: every settings change bumps it; every request compares it.

    def generation(self) -> int:
        return int(self._generation.value)

    def bump_generation(self) -> None:
        self._generation.release()

    # Credential gates.

    def credential_gate(self, user_id: uuid.UUID, cap_version: int, cap: int) -> Gate:
        name = credential_gate_name(self.namespace, user_id, cap_version, cap)
        gate = self._credential_gates.get(name)
        if gate is None:
            # Every worker derives the same name from the same row, so O_CREAT either
            # creates it with the row's cap or opens the one another worker created.
            sem = posix_ipc.Semaphore(name, posix_ipc.O_CREAT, mode=0o600, initial_value=cap)
            gate = self._credential_gates[name] = Gate(name, cap, sem)
        return gate

    def forget_credential_gates(self) -> None:
        """Drop every cached credential gate (after a settings change anywhere)."""
        for gate in self._credential_gates.values():
            gate.retired = True
            if not gate.holders:
                gate.close()
        self._credential_gates.clear()

    def unlink_credential_gate(self, user_id: uuid.UUID, cap_version: int, cap: int) -> None:
        """Remove an old name; holders keep their handles and release onto it."""
        unlink_semaphore(credential_gate_name(self.namespace, user_id, cap_version, cap))

    def unlink_name(self, name: str) -> None:
        unlink_semaphore(name)

    def credential_in_use(self, user_id: uuid.UUID, cap_version: int, cap: int) -> int:
        """Permits held on a credential's gate by every worker; 0 before any request opened it.

        Opens the name without creating it: a status read must not make a gate that a
        settings change could be about to unlink.
        """
        name = credential_gate_name(self.namespace, user_id, cap_version, cap)
        try:
            sem = posix_ipc.Semaphore(name)
        except posix_ipc.ExistentialError:
            return 0
        try:
            free = int(sem.value)
        finally:
            sem.close()
        # Only an over-release (a bug elsewhere) could make free exceed the cap.
        return max(0, cap - free)

    # Admission.

    def admit(self, credential: Gate) -> Permit | Rejected:
        ledger = self.ledger
        global_gate = self.global_gate
        if global_gate is not None:
            if not global_gate.try_acquire():
                return Rejected(scope="global", cap=global_gate.cap)
            _recorded(global_gate, ledger)
        if not credential.try_acquire():
            if global_gate is not None:
                _give_back(global_gate, ledger)
            return Rejected(scope="credential", cap=credential.cap)
        try:
            _recorded(credential, ledger)
        except LedgerFull:
            if global_gate is not None:
                _give_back(global_gate, ledger)
            raise
        gates = (credential,) if global_gate is None else (global_gate, credential)
        return Permit(gates, ledger)

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
