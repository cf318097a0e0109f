"""The drift audit: repairs a gate that stood still with a wrong count, and nothing else."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable

import posix_ipc
import pytest

from ipc import audit as audit_module
from ipc.audit import Audit, Repair, repairs_made
from ipc.caps import apply_cap, read_state
from ipc.gates import Gatekeeper, Permit
from ipc.naming import credential_gate_name, global_gate_name
from tests.ipc.conftest import GLOBAL_CAP, OtherProcess, sem_value, take, wait_for


def quiet_passes(audit: Audit, passes: int = 2) -> list[Repair]:
    """Passes an interval apart (the audit is built with interval 1; time is passed in)."""
    repairs: list[Repair] = []
    for _ in range(passes):
        clock[0] += 1.0
        repairs += audit.run_once(clock[0])
    return repairs


clock = [1000.0]


def new_audit(namespace: str) -> Audit:
    return Audit(namespace, interval=1.0)


def test_a_consistent_namespace_needs_no_repair(
    gatekeeper: Gatekeeper, spawn: Callable[..., OtherProcess]
) -> None:
    ns = gatekeeper.namespace
    other = spawn()
    user = uuid.uuid4()
    held = [gatekeeper.admit(gatekeeper.credential_gate(user, 1, 4)) for _ in range(2)]
    assert all(isinstance(p, Permit) for p in held)
    assert other.admit(user, 1, 4) == {"admitted": True}
    apply_cap(ns, user, version=2, cap=2)  # one to drain: a debt is not drift
    assert quiet_passes(new_audit(ns), 3) == []
    assert repairs_made(ns) == {"global": 0, "credential": 0}


def test_a_lost_permit_is_given_back_once(gatekeeper: Gatekeeper) -> None:
    ns, user = gatekeeper.namespace, uuid.uuid4()
    gate = gatekeeper.credential_gate(user, 1, 3)
    permit = gatekeeper.admit(gate)
    assert isinstance(permit, Permit)
    take(credential_gate_name(ns, user), 1)  # as a kill between acquire and record leaves
    take(global_gate_name(ns, GLOBAL_CAP), 2)
    audit = new_audit(ns)
    assert quiet_passes(audit, 1) == []  # one reading is not enough to judge
    repairs = quiet_passes(audit, 1)
    assert sorted(repairs, key=lambda r: r.scope) == [
        Repair(gate=credential_gate_name(ns, user), scope="credential", drift=1),
        Repair(gate=global_gate_name(ns, GLOBAL_CAP), scope="global", drift=2),
    ]
    assert quiet_passes(audit, 3) == []  # once
    assert (gate.free, sem_value(global_gate_name(ns, GLOBAL_CAP))) == (2, GLOBAL_CAP - 1)
    assert repairs_made(ns) == {"global": 1, "credential": 1}
    permit.release()
    assert gate.free == 3


def test_an_over_release_is_taken_back(gatekeeper: Gatekeeper) -> None:
    ns, user = gatekeeper.namespace, uuid.uuid4()
    gate = gatekeeper.credential_gate(user, 1, 2)
    held = [gatekeeper.admit(gate) for _ in range(2)]
    sem = posix_ipc.Semaphore(credential_gate_name(ns, user))
    try:
        sem.release()  # a permit given back twice
    finally:
        sem.close()
    assert gate.free == 1
    assert quiet_passes(new_audit(ns)) == [
        Repair(gate=credential_gate_name(ns, user), scope="credential", drift=-1)
    ]
    state = read_state(ns, user)
    assert state is not None and (state.free, state.debt, state.in_use) == (0, 0, 2)
    for permit in held:
        assert isinstance(permit, Permit)
        permit.release()
    assert gate.free == 2


def test_a_gate_that_moved_is_not_judged(gatekeeper: Gatekeeper) -> None:
    ns, user = gatekeeper.namespace, uuid.uuid4()
    gate = gatekeeper.credential_gate(user, 1, 3)
    take(credential_gate_name(ns, user), 1)
    audit = new_audit(ns)
    assert quiet_passes(audit, 1) == []
    permit = gatekeeper.admit(gate)  # it moved between the two readings
    assert isinstance(permit, Permit)
    assert quiet_passes(audit, 1) == []
    assert audit.run_once(clock[0] + 0.5) == []  # still for half an interval only
    assert [r.drift for r in quiet_passes(audit, 1)] == [1]
    permit.release()


def test_no_repair_while_a_worker_is_stopped(
    gatekeeper: Gatekeeper, spawn: Callable[..., OtherProcess]
) -> None:
    """A stopped worker could be sitting between a semaphore call and its ledger write."""
    ns, user = gatekeeper.namespace, uuid.uuid4()
    other = spawn()
    assert other.admit(user, 1, 3) == {"admitted": True}
    take(credential_gate_name(ns, user), 1)
    audit = new_audit(ns)
    os.kill(other.pid, signal.SIGSTOP)
    assert wait_for(lambda: audit_module._stopped(other.pid), timeout=5)  # signals are async
    try:
        assert quiet_passes(audit, 3) == []
    finally:
        os.kill(other.pid, signal.SIGCONT)
    assert [r.drift for r in quiet_passes(audit)] == [1]


@pytest.mark.parametrize("drift", [2, -2])
def test_a_repair_keeps_the_invariant_under_a_debt(gatekeeper: Gatekeeper, drift: int) -> None:
    ns, user = gatekeeper.namespace, uuid.uuid4()
    gate = gatekeeper.credential_gate(user, 1, 4)
    held = [gatekeeper.admit(gate) for _ in range(4)]
    apply_cap(ns, user, version=2, cap=1)  # 3 owed
    if drift < 0:
        sem = posix_ipc.Semaphore(credential_gate_name(ns, user))
        try:
            for _ in range(-drift):
                sem.release()  # given back twice
        finally:
            sem.close()
    else:
        # Two of the four holders die without a trace, leaving 3 owed and 2 held.
        for permit in held[:2]:
            assert isinstance(permit, Permit)
            permit.released = True
            gatekeeper.ledger.unrecord(gate.name)
            gate.holders -= 1
        held = held[2:]
    assert [r.drift for r in quiet_passes(new_audit(ns))] == [drift]
    state = read_state(ns, user)
    assert state is not None
    assert state.free + len(held) - state.debt == state.applied == 1
    for permit in held:
        assert isinstance(permit, Permit)
        permit.release()
    state = read_state(ns, user)
    assert state is not None and state.in_use == 0
    admitted = [gatekeeper.admit(gate) for _ in range(3)]
    assert [isinstance(result, Permit) for result in admitted] == [True, False, False]
