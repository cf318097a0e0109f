"""Admission through the global and credential gates, with real semaphores and processes."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable

import pytest

from ipc.errors import LedgerFull
from ipc.gates import Gatekeeper, Permit, Rejected
from ipc.ledger import Ledger, read_ledger
from ipc.namespace import NamespaceClaim
from ipc.naming import credential_gate_name, list_semaphores
from tests.ipc.conftest import GLOBAL_CAP, OtherProcess, sem_value


def admit(keeper: Gatekeeper, user: uuid.UUID, cap: int, *, version: int = 1) -> Permit:
    result = keeper.admit(keeper.credential_gate(user, version, cap))
    assert isinstance(result, Permit), result
    return result


@pytest.mark.parametrize("cap", [1, 3])
def test_credential_gate_admits_its_cap_then_rejects(gatekeeper: Gatekeeper, cap: int) -> None:
    gate = gatekeeper.credential_gate(uuid.uuid4(), 1, cap)
    permits = [gatekeeper.admit(gate) for _ in range(cap)]
    assert all(isinstance(permit, Permit) for permit in permits)
    assert gatekeeper.admit(gate) == Rejected(scope="credential", cap=cap)
    assert gate.free == 0


def test_global_gate_caps_across_credentials(gatekeeper: Gatekeeper) -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    for _ in range(GLOBAL_CAP // 2):
        admit(gatekeeper, first, GLOBAL_CAP)
    for _ in range(GLOBAL_CAP - GLOBAL_CAP // 2):
        admit(gatekeeper, second, GLOBAL_CAP)
    second_gate = gatekeeper.credential_gate(second, 1, GLOBAL_CAP)
    assert gatekeeper.admit(second_gate) == Rejected(scope="global", cap=GLOBAL_CAP)
    assert gatekeeper.admit(gatekeeper.credential_gate(uuid.uuid4(), 1, 2)) == Rejected(
        scope="global", cap=GLOBAL_CAP
    )
    assert gatekeeper.global_gate is not None
    assert gatekeeper.global_gate.free == 0
    assert second_gate.free == GLOBAL_CAP // 2  # a global rejection takes nothing from it


def test_credential_rejection_gives_the_global_permit_back(gatekeeper: Gatekeeper) -> None:
    global_gate = gatekeeper.global_gate
    assert global_gate is not None
    other_gate = gatekeeper.credential_gate(uuid.uuid4(), 1, 1)
    gate = gatekeeper.credential_gate(uuid.uuid4(), 1, 1)
    assert isinstance(gatekeeper.admit(other_gate), Permit)
    assert isinstance(gatekeeper.admit(gate), Permit)
    assert global_gate.free == GLOBAL_CAP - 2
    for _ in range(3):
        assert gatekeeper.admit(gate) == Rejected(scope="credential", cap=1)
        assert global_gate.free == GLOBAL_CAP - 2
        assert global_gate.holders == 2
    assert gatekeeper.ledger.held() == {global_gate.name: 2, other_gate.name: 1, gate.name: 1}


def test_permit_release_is_idempotent(gatekeeper: Gatekeeper) -> None:
    global_gate = gatekeeper.global_gate
    assert global_gate is not None
    gate = gatekeeper.credential_gate(uuid.uuid4(), 1, 2)
    permit = gatekeeper.admit(gate)
    assert isinstance(permit, Permit)
    assert permit.release() is True
    assert permit.released
    assert permit.release() is False
    assert permit.release() is False
    assert (gate.free, global_gate.free) == (2, GLOBAL_CAP)
    assert (gate.holders, global_gate.holders) == (0, 0)
    assert gatekeeper.ledger.held() == {}


def test_ledger_tracks_admits_and_releases(gatekeeper: Gatekeeper) -> None:
    global_gate = gatekeeper.global_gate
    assert global_gate is not None
    gate = gatekeeper.credential_gate(uuid.uuid4(), 4, 5)
    ledger = gatekeeper.ledger

    def on_disk() -> dict[str, int]:
        snapshot = read_ledger(ledger.name)
        assert snapshot is not None
        return {holding.name: holding.count for holding in snapshot.holdings}

    permits = []
    for k in range(1, 5):
        result = gatekeeper.admit(gate)
        assert isinstance(result, Permit)
        permits.append(result)
        assert ledger.held() == {global_gate.name: k, gate.name: k} == on_disk()
    for k in range(3, -1, -1):
        permits.pop().release()
        expected = {global_gate.name: k, gate.name: k} if k else {}
        assert ledger.held() == expected == on_disk()
    assert (gate.free, global_gate.free) == (5, GLOBAL_CAP)


def test_forgotten_gate_still_takes_its_permit_back(gatekeeper: Gatekeeper) -> None:
    user = uuid.uuid4()
    old_gate = gatekeeper.credential_gate(user, 1, 2)
    permit = admit(gatekeeper, user, 2)
    gatekeeper.forget_credential_gates()
    assert old_gate.retired
    new_gate = gatekeeper.credential_gate(user, 1, 2)  # same name, a fresh handle
    assert new_gate is not old_gate
    assert new_gate.free == 1
    other = admit(gatekeeper, user, 2)
    assert gatekeeper.admit(new_gate) == Rejected(scope="credential", cap=2)
    assert permit.release() is True
    assert new_gate.free == 1
    assert other.release() is True
    assert new_gate.free == 2
    assert gatekeeper.global_gate is not None
    assert gatekeeper.global_gate.free == GLOBAL_CAP
    assert gatekeeper.ledger.held() == {}


def test_a_cap_change_resizes_the_same_semaphore(gatekeeper: Gatekeeper) -> None:
    user = uuid.uuid4()
    gate = gatekeeper.credential_gate(user, 1, 2)
    permit = admit(gatekeeper, user, 2)
    gatekeeper.forget_credential_gates()
    raised = gatekeeper.credential_gate(user, 2, 3)  # version 2 raises the cap to 3
    assert raised.name == gate.name == credential_gate_name(gatekeeper.namespace, user)
    assert raised.state().in_use == 1
    assert raised.free == 2
    assert permit.release() is True  # onto the one semaphore the new handle also uses
    assert raised.free == 3
    assert list_semaphores(gatekeeper.namespace).count(gate.name) == 1
    assert gatekeeper.ledger.held() == {}


def test_without_a_global_gate_only_the_credential_counts(ipc_namespace: str) -> None:
    with NamespaceClaim(ipc_namespace, global_cap=None):
        ledger = Ledger(ipc_namespace, slots=4)
        keeper = Gatekeeper(ipc_namespace, global_cap=None, ledger=ledger)
        try:
            assert keeper.global_gate is None
            user = uuid.uuid4()
            gate = keeper.credential_gate(user, 1, 2)
            permits = [admit(keeper, user, 2) for _ in range(2)]
            assert keeper.admit(gate) == Rejected(scope="credential", cap=2)
            assert ledger.held() == {gate.name: 2}
            for permit in permits:
                permit.release()
            assert gate.free == 2
        finally:
            keeper.close()
            ledger.close()


def test_ledger_full_during_admit_keeps_no_permit(ipc_namespace: str) -> None:
    with NamespaceClaim(ipc_namespace, global_cap=GLOBAL_CAP):
        ledger = Ledger(ipc_namespace, slots=1)  # room for the global gate only
        keeper = Gatekeeper(ipc_namespace, global_cap=GLOBAL_CAP, ledger=ledger)
        try:
            gate = keeper.credential_gate(uuid.uuid4(), 1, 3)
            with contextlib.suppress(LedgerFull):
                keeper.admit(gate)
            assert keeper.global_gate is not None
            assert (keeper.global_gate.free, gate.free) == (GLOBAL_CAP, 3)
            assert ledger.held() == {}
        finally:
            keeper.close()
            ledger.close()


def test_two_workers_share_one_credential_gate(
    gatekeeper: Gatekeeper, spawn: Callable[..., OtherProcess]
) -> None:
    other = spawn()
    user, cap = uuid.uuid4(), 5
    gate = gatekeeper.credential_gate(user, 7, cap)
    admitted_there = [other.admit(user, 7, cap) for _ in range(3)]
    assert admitted_there == [{"admitted": True}] * 3
    here = [gatekeeper.admit(gate) for _ in range(3)]
    assert [isinstance(result, Permit) for result in here] == [True, True, False]
    assert here[2] == Rejected(scope="credential", cap=cap)
    assert other.admit(user, 7, cap) == {"admitted": False, "scope": "credential", "cap": cap}
    assert gate.free == 0
    assert gatekeeper.global_gate is not None
    assert other.request("held") == {gate.name: 3, gatekeeper.global_gate.name: 3}

    assert other.request("release") is True
    assert gate.free == 1
    assert isinstance(gatekeeper.admit(gate), Permit)
    assert other.exit() == 0  # gives back its remaining two
    assert gate.free == 2
    assert gatekeeper.global_gate.free == GLOBAL_CAP - 3


def test_two_workers_share_one_global_gate(
    gatekeeper: Gatekeeper, spawn: Callable[..., OtherProcess]
) -> None:
    other = spawn()
    for _ in range(GLOBAL_CAP - 2):
        assert other.admit(uuid.uuid4(), 1, 1) == {"admitted": True}
    admit(gatekeeper, uuid.uuid4(), 1)
    admit(gatekeeper, uuid.uuid4(), 1)
    assert gatekeeper.admit(gatekeeper.credential_gate(uuid.uuid4(), 1, 1)) == Rejected(
        scope="global", cap=GLOBAL_CAP
    )
    assert other.admit(uuid.uuid4(), 1, 1) == {
        "admitted": False,
        "scope": "global",
        "cap": GLOBAL_CAP,
    }


def test_generation_bumps_are_seen_by_the_other_worker(
    gatekeeper: Gatekeeper, spawn: Callable[..., OtherProcess]
) -> None:
    other = spawn()
    start = gatekeeper.generation()
    assert other.request("generation") == start
    other.request("bump")
    assert gatekeeper.generation() == start + 1
    gatekeeper.bump_generation()
    gatekeeper.bump_generation()
    assert other.request("generation") == start + 3
    assert sem_value(f"/{gatekeeper.namespace}.gen") == start + 3
