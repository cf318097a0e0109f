"""The drift audit: repairs a gate that stood still with a wrong count, and nothing else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable

import posix_ipc
import pytest

from ipc import audit as audit_module
from ipc.audit import Audit, Repair, repairs_made
from ipc.caps import apply_cap, read_state
from ipc.gates import Gatekeeper, Permit
from ipc.naming import credential_gate_name, global_gate_name
from tests.ipc.conftest import GLOBAL_CAP, ROOT, OtherProcess, sem_value, take, wait_for


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


# -- readings taken mid-operation (found by review): nothing was killed, nothing to repair


class _Between:
    """Runs ``step`` once per pass, after every ledger is read and before any semaphore
    is: a real request of another process lands exactly there."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, step: Callable[[], None]) -> None:
        real = audit_module.GateReader._global
        self.armed = True

        def between(reader: audit_module.GateReader, name: str) -> object:
            if self.armed:
                self.armed = False
                step()
            return real(reader, name)

        monkeypatch.setattr(audit_module.GateReader, "_global", between)


def admits(gatekeeper: Gatekeeper, user: uuid.UUID, cap: int) -> int:
    """How many requests the credential admits now (then gives them back)."""
    gate = gatekeeper.credential_gate(user, 1, cap)
    held = []
    while isinstance(permit := gatekeeper.admit(gate), Permit):
        held.append(permit)
    for permit in held:
        permit.release()
    return len(held)


def test_a_request_between_the_ledger_and_semaphore_reads_is_not_drift(
    gatekeeper: Gatekeeper, spawn: Callable[..., OtherProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose slot for the gate is back at 0 admits a request between the two
    reads: the reading shows a permit missing, twice in a row. The slot's operation
    counter (idle slots are read too) shows the gate moved in between."""
    ns, user = gatekeeper.namespace, uuid.uuid4()
    other = spawn()
    assert other.admit(user, 1, 2) == {"admitted": True}
    assert other.request("release") is True  # its slots: count 0, operations 2
    between = _Between(monkeypatch, lambda: other.admit(user, 1, 2))
    audit = new_audit(ns)
    repairs = []
    for _ in range(3):
        between.armed = True
        repairs += quiet_passes(audit, 1)
        assert other.request("release") is True  # each request ends before the next pass
    monkeypatch.undo()
    assert repairs == []
    assert sem_value(global_gate_name(ns, GLOBAL_CAP)) == GLOBAL_CAP
    assert admits(gatekeeper, user, 2) == 2


def test_a_slot_renamed_between_readings_does_not_hide_a_request(
    gatekeeper: Gatekeeper, spawn: Callable[..., OtherProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same, with the worker's slot for the gate reused by another gate in between:
    freed slots are reused oldest first, so the gate's own slot keeps its counter."""
    ns, user, other_user = gatekeeper.namespace, uuid.uuid4(), uuid.uuid4()
    other = spawn()

    def one_request(on: uuid.UUID) -> None:
        assert other.admit(on, 1, 2) == {"admitted": True}
        assert other.request("release") is True

    one_request(user)
    one_request(other_user)
    between = _Between(monkeypatch, lambda: other.admit(user, 1, 2))
    audit = new_audit(ns)
    repairs = []
    for _ in range(3):
        between.armed = True
        repairs += [r for r in quiet_passes(audit, 1) if r.scope == "credential"]
        assert other.request("release") is True
        between.armed = False
        one_request(other_user)
    monkeypatch.undo()
    assert repairs == []
    assert admits(gatekeeper, user, 2) == 2


STOPPED_MID_ADMISSION = textwrap.dedent(
    """
    import os, signal, sys, time, uuid
    from ipc.gates import Gatekeeper, _recorded
    from ipc.ledger import Ledger
    ns, user = sys.argv[1], uuid.UUID(sys.argv[2])
    ledger = Ledger(ns, slots=8)
    keeper = Gatekeeper(ns, global_cap=None, ledger=ledger)
    gate = keeper.credential_gate(user, 1, 2)
    print("ready", flush=True)
    sys.stdin.readline()
    assert gate.try_acquire()          # Gatekeeper.admit: the semaphore call ...
    os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(0.5)                    # ... (scheduled again a moment after SIGCONT) ...
    _recorded(gate, ledger)            # ... then its ledger write
    print("recorded", flush=True)
    sys.stdin.readline()
    """
)


def test_a_worker_stopped_mid_admission_is_not_judged_as_soon_as_it_runs(
    gatekeeper: Gatekeeper,
) -> None:
    """Readings taken while a worker was stopped do not count towards a quiet interval:
    the first pass after SIGCONT starts the interval again."""
    ns, user = gatekeeper.namespace, uuid.uuid4()
    helper = subprocess.Popen(
        [sys.executable, "-c", STOPPED_MID_ADMISSION, ns, user.hex],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert helper.stdin is not None and helper.stdout is not None
        assert helper.stdout.readline().strip() == "ready"
        helper.stdin.write("go\n")
        helper.stdin.flush()
        assert wait_for(lambda: audit_module._stopped(helper.pid), timeout=10)
        audit = new_audit(ns)
        assert quiet_passes(audit, 3) == []  # stopped: not judged
        os.kill(helper.pid, signal.SIGCONT)
        repairs = audit.run_once(clock[0] + 0.25)  # before it ran its next line
        assert helper.stdout.readline().strip() == "recorded"
        state = read_state(ns, user)
        assert state is not None
        assert (repairs, state.free) == ([], 1)
    finally:
        if helper.poll() is None:
            os.kill(helper.pid, signal.SIGKILL)
        helper.wait()
