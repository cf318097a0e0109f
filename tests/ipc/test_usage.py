"""What `caps` reports: every gate's cap, permits in use and free, and the ledgers' totals."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from ipc.gates import Gatekeeper, Permit
from ipc.namespace import GateUsage, NamespaceClaim, held_by_ledgers, usage
from ipc.naming import credential_gate_name, global_gate_name
from tests.ipc.conftest import GLOBAL_CAP, OtherProcess


def by_name(rows: list[GateUsage]) -> dict[str, GateUsage]:
    return {row.name: row for row in rows}


def test_usage_of_a_fresh_namespace_is_the_global_gate_only(claim: NamespaceClaim) -> None:
    assert usage(claim.namespace) == [
        GateUsage(
            name=global_gate_name(claim.namespace, GLOBAL_CAP),
            scope="global",
            user_id=None,
            cap=GLOBAL_CAP,
            in_use=0,
            free=GLOBAL_CAP,
        )
    ]
    assert held_by_ledgers(claim.namespace) == {}


def test_usage_and_ledgers_across_two_workers(
    gatekeeper: Gatekeeper, spawn: Callable[..., OtherProcess]
) -> None:
    ns = gatekeeper.namespace
    first, second = uuid.uuid4(), uuid.uuid4()
    other = spawn()
    permits = []
    for _ in range(2):
        result = gatekeeper.admit(gatekeeper.credential_gate(first, 3, 4))
        assert isinstance(result, Permit)
        permits.append(result)
    assert other.admit(first, 3, 4) == {"admitted": True}
    assert other.admit(second, 1, 1) == {"admitted": True}
    global_name = global_gate_name(ns, GLOBAL_CAP)
    first_name = credential_gate_name(ns, first)
    second_name = credential_gate_name(ns, second)

    assert by_name(usage(ns)) == {
        global_name: GateUsage(
            name=global_name,
            scope="global",
            user_id=None,
            cap=GLOBAL_CAP,
            in_use=4,
            free=GLOBAL_CAP - 4,
        ),
        first_name: GateUsage(
            name=first_name,
            scope="credential",
            user_id=str(first),
            cap=4,
            in_use=3,
            free=1,
        ),
        second_name: GateUsage(
            name=second_name,
            scope="credential",
            user_id=str(second),
            cap=1,
            in_use=1,
            free=0,
        ),
    }
    assert held_by_ledgers(ns) == {global_name: 4, first_name: 3, second_name: 1}

    for permit in permits:
        permit.release()
    assert other.exit() == 0
    assert all(row.in_use == 0 and row.free == row.cap for row in usage(ns))
    assert held_by_ledgers(ns) == {}  # this worker's ledger is still there, all zeros
