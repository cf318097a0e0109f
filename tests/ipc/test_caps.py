"""A credential's cap resized in place: exact through lowering, raising, races and kills."""

from __future__ import annotations

import fcntl
import random
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable

import posix_ipc
import pytest

from ipc import caps as caps_module
from ipc.audit import Audit
from ipc.caps import (
    CapState,
    apply_cap,
    mark_deleted,
    open_credential_gate,
    read_records,
    read_state,
    resume_resize,
    sweep_deleted,
)
from ipc.errors import CredentialGone
from ipc.gates import Gatekeeper, Permit, Rejected
from ipc.namespace import held_by_ledgers
from ipc.naming import cap_record_name, credential_debt_name, credential_gate_name
from tests.fixtures.gateway import shm_leftovers
from tests.ipc.conftest import ROOT, OtherProcess, sem_value


def admit_many(keeper: Gatekeeper, user: uuid.UUID, version: int, cap: int, n: int) -> list[Permit]:
    gate = keeper.credential_gate(user, version, cap)
    permits = []
    for _ in range(n):
        result = keeper.admit(gate)
        assert isinstance(result, Permit), result
        permits.append(result)
    return permits


def admitted_now(keeper: Gatekeeper, user: uuid.UUID, version: int, cap: int) -> list[Permit]:
    """Admit until refused; the permits that got in."""
    gate = keeper.credential_gate(user, version, cap)
    permits = []
    while isinstance(result := keeper.admit(gate), Permit):
        permits.append(result)
    assert result == Rejected(scope="credential", cap=gate.cap)
    return permits


def invariant_holds(namespace: str, user: uuid.UUID, held: int) -> CapState:
    state = read_state(namespace, user)
    assert state is not None
    assert state.free + held - state.debt == state.applied
    assert state.in_use == held
    return state


def test_a_lowered_cap_counts_the_requests_in_flight(gatekeeper: Gatekeeper) -> None:
    ns, user = gatekeeper.namespace, uuid.uuid4()
    held = admit_many(gatekeeper, user, 1, 8, 5)
    apply_cap(ns, user, version=2, cap=2)
    state = invariant_holds(ns, user, 5)
    assert (state.cap, state.in_use, state.to_drain) == (2, 5, 3)
    gate = gatekeeper.credential_gate(user, 2, 2)
    assert gatekeeper.admit(gate) == Rejected(scope="credential", cap=2)
    for still_in_flight in (4, 3, 2):
        held.pop().release()
        assert gatekeeper.admit(gate) == Rejected(scope="credential", cap=2)
        invariant_holds(ns, user, still_in_flight)
    held.pop().release()  # one in flight now: one slot under the cap of 2
    assert len(admitted_now(gatekeeper, user, 2, 2)) == 1
    for permit in held:
        permit.release()


def test_a_raised_cap_frees_the_extra_slots_at_once(gatekeeper: Gatekeeper) -> None:
    ns, user = gatekeeper.namespace, uuid.uuid4()
    held = admit_many(gatekeeper, user, 1, 2, 2)
    apply_cap(ns, user, version=2, cap=6)
    more = admitted_now(gatekeeper, user, 2, 6)
    assert len(more) == 4
    invariant_holds(ns, user, 6)
    for permit in held + more:
        permit.release()
    assert invariant_holds(ns, user, 0).free == 6


def test_raising_forgives_debt_still_owed(gatekeeper: Gatekeeper) -> None:
    ns, user = gatekeeper.namespace, uuid.uuid4()
    held = admit_many(gatekeeper, user, 1, 4, 4)
    apply_cap(ns, user, version=2, cap=1)  # 3 owed
    assert sem_value(credential_debt_name(ns, user)) == 3
    apply_cap(ns, user, version=3, cap=3)  # 2 forgiven: 1 owed, 4 in flight, cap 3
    state = invariant_holds(ns, user, 4)
    assert (state.debt, state.to_drain) == (1, 1)
    held.pop().release()
    held.pop().release()
    assert len(admitted_now(gatekeeper, user, 3, 3)) == 1  # 2 in flight -> room for one
    invariant_holds(ns, user, 3)


def test_an_older_change_applied_late_is_ignored(gatekeeper: Gatekeeper) -> None:
    ns, user = gatekeeper.namespace, uuid.uuid4()
    apply_cap(ns, user, version=10, cap=3)
    apply_cap(ns, user, version=9, cap=7)  # committed before, applied after: loses
    state = read_state(ns, user)
    assert state is not None
    assert (state.version, state.cap, state.free) == (10, 3, 3)
    assert len(admitted_now(gatekeeper, user, 9, 7)) == 3


def test_a_debt_is_paid_by_releases_in_another_process(
    gatekeeper: Gatekeeper, spawn: Callable[..., OtherProcess]
) -> None:
    user = uuid.uuid4()
    other = spawn()
    for _ in range(4):
        assert other.admit(user, 1, 4) == {"admitted": True}
    other.request("apply", user=user.hex, version=2, cap=1)  # lowered from the other side
    gate = gatekeeper.credential_gate(user, 2, 1)
    for _ in range(3):
        assert other.request("release") is True
        assert gatekeeper.admit(gate) == Rejected(scope="credential", cap=1)
    assert other.request("release") is True
    assert len(admitted_now(gatekeeper, user, 2, 1)) == 1
    assert other.admit(user, 2, 1) == {"admitted": False, "scope": "credential", "cap": 1}


def test_changes_from_two_processes_converge_on_the_last(
    gatekeeper: Gatekeeper, spawn: Callable[..., OtherProcess]
) -> None:
    """Random changes from two processes while permits come and go: no permit is lost or
    doubled, the invariant holds after every step, and the last version's cap stands."""
    ns, user = gatekeeper.namespace, uuid.uuid4()
    other = spawn()
    rng = random.Random(7)
    gate = gatekeeper.credential_gate(user, 1, 4)
    here: list[Permit] = []
    there = 0
    version, cap = 1, 4
    for _ in range(300):
        move = rng.random()
        if move < 0.25:
            version, cap = version + 1, rng.randint(1, 8)
            if rng.random() < 0.5:
                apply_cap(ns, user, version=version, cap=cap)
            else:
                other.request("apply", user=user.hex, version=version, cap=cap)
        elif move < 0.45:
            result = gatekeeper.admit(gate)
            if isinstance(result, Permit):
                here.append(result)
        elif move < 0.6:
            there += other.admit(user, 1, 4)["admitted"]
        elif move < 0.8 and here:
            here.pop(rng.randrange(len(here))).release()
        elif there:
            assert other.request("release") is True
            there -= 1
        state = invariant_holds(ns, user, len(here) + there)
        assert state.cap == cap
        if state.in_use > cap:  # over the cap in force: nothing may be admitted
            assert state.free <= state.debt
    for permit in here:
        permit.release()
    for _ in range(there):
        assert other.request("release") is True
    assert len(admitted_now(gatekeeper, user, version, cap)) == cap


def test_a_resize_cut_short_by_a_kill_is_resumed(gatekeeper: Gatekeeper) -> None:
    """Forge what a process killed half-way through lowering 6 -> 2 leaves: the target
    recorded, two of four steps done."""
    ns, user = gatekeeper.namespace, uuid.uuid4()
    apply_cap(ns, user, version=1, cap=6)
    sem = posix_ipc.Semaphore(credential_gate_name(ns, user))
    shm = posix_ipc.SharedMemory(cap_record_name(ns, user))
    try:
        sem.acquire(0)
        sem.acquire(0)
        import mmap

        with mmap.mmap(shm.fd, caps_module._RECORD.size) as view:
            caps_module._RECORD.pack_into(view, 0, caps_module._MAGIC, 2, 2, 4)
    finally:
        sem.close()
        shm.close_fd()
    assert read_records(ns)[user].applied == 4
    assert resume_resize(ns, user) is True
    assert resume_resize(ns, user) is False
    state = invariant_holds(ns, user, 0)
    assert (state.cap, state.applied, state.free) == (2, 2, 2)
    assert len(admitted_now(gatekeeper, user, 2, 2)) == 2


def test_a_fresh_gate_starts_full_at_the_stored_cap(gatekeeper: Gatekeeper) -> None:
    ns, user = gatekeeper.namespace, uuid.uuid4()
    assert read_state(ns, user) is None
    gate = gatekeeper.credential_gate(user, 5, 3)
    assert gate.state() == CapState(user_id=user, version=5, cap=3, applied=3, free=3, debt=0)
    assert read_records(ns)[user].version == 5


# -- creation and deletion against kills and races (found by review) --------------------

KILLED_WHILE_CREATING = textwrap.dedent(
    """
    import os, signal, sys, uuid
    import posix_ipc
    from ipc.caps import _locked_record
    from ipc.naming import credential_gate_name
    ns, user, cap = sys.argv[1], uuid.UUID(sys.argv[2]), int(sys.argv[3])
    with _locked_record(ns, user):  # as open_credential_gate does for a new credential
        posix_ipc.Semaphore(
            credential_gate_name(ns, user), posix_ipc.O_CREAT, mode=0o600, initial_value=cap
        )
        os.kill(os.getpid(), signal.SIGKILL)  # killed before the record's magic
    """
)


def test_a_creator_killed_before_the_record_is_written_leaves_no_wrong_gate(
    gatekeeper: Gatekeeper,
) -> None:
    """The next opener finds a gate full at another cap and no record: it starts afresh."""
    ns, user = gatekeeper.namespace, uuid.uuid4()
    child = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_CREATING, ns, user.hex, "8"], cwd=ROOT, check=False
    )
    assert child.returncode == -signal.SIGKILL
    apply_cap(ns, user, version=2, cap=2)
    assert len(admitted_now(gatekeeper, user, 2, 2)) == 2


@pytest.mark.parametrize("opener", ["apply_cap", "open_credential_gate"])
def test_a_lock_taken_on_a_removed_record_is_taken_again(
    gatekeeper: Gatekeeper, monkeypatch: pytest.MonkeyPatch, opener: str
) -> None:
    """The record is removed (a deleted user's, swept by the launcher) between an opener
    opening it by name and getting its lock: the opener locks the name's new record."""
    ns, user = gatekeeper.namespace, uuid.uuid4()
    open_credential_gate(ns, user, version=1, cap=4).close()
    mark_deleted(ns, user)
    real_flock = fcntl.flock
    swept: list[bool] = []

    def flock_after_the_sweep(fd: int, operation: int) -> None:
        if not swept:
            swept.append(True)
            assert sweep_deleted(ns, {}) == 1
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_the_sweep)
    try:
        if opener == "apply_cap":
            apply_cap(ns, user, version=2, cap=2)
        else:
            open_credential_gate(ns, user, version=2, cap=2).close()
    finally:
        monkeypatch.undo()
    state = read_state(ns, user)  # a record and its gate, consistent, at the new cap
    assert state is not None and (state.cap, state.free, state.debt) == (2, 2, 0)


def test_a_deleted_users_gate_is_never_opened_again_and_goes_once_free(
    gatekeeper: Gatekeeper, spawn: Callable[..., OtherProcess]
) -> None:
    """`gateway users delete` while this worker holds two permits: a worker holding a row
    read before the delete cannot open the gate again (no second counter under one name),
    the audit repairs nothing, and the launcher removes the objects once they are free."""
    ns, user = gatekeeper.namespace, uuid.uuid4()
    gate = gatekeeper.credential_gate(user, 1, 3)
    held = [gatekeeper.admit(gate) for _ in range(2)]
    mark_deleted(ns, user)
    other = spawn()
    assert other.admit(user, 1, 3) == {"admitted": False, "gone": True}
    with pytest.raises(CredentialGone):
        apply_cap(ns, user, version=5, cap=1)
    apply_cap(ns, user, version=5, cap=1, create=False)  # the CLI's: a no-op
    audit = Audit(ns, interval=1.0)
    assert audit.run_once(1000.0) + audit.run_once(1001.0) + audit.run_once(1002.0) == []
    assert sweep_deleted(ns, held_by_ledgers(ns)) == 0  # still held here
    for permit in held:
        assert isinstance(permit, Permit)
        permit.release()
    gatekeeper.drop_deleted_gates()
    assert sweep_deleted(ns, held_by_ledgers(ns)) == 1
    assert [n for n in shm_leftovers(ns) if user.hex in n] == []
