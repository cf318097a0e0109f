"""The launcher's claim on a namespace: the lock, the purge of an earlier run, a clean exit."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable

import posix_ipc
import pytest

from ipc.caps import apply_cap
from ipc.errors import InvalidName, NamespaceBusy, NamespaceMissing
from ipc.gates import Gatekeeper, Permit, unlink_semaphore
from ipc.ledger import Ledger, read_ledger
from ipc.namespace import NamespaceClaim, bump_generation, bump_generations, purge
from ipc.naming import (
    credential_gate_name,
    generation_name,
    global_gate_name,
    list_cap_records,
    list_ledgers,
    list_namespaces,
    list_semaphores,
    lock_path,
)
from tests.fixtures.gateway import shm_leftovers
from tests.ipc.conftest import GLOBAL_CAP, ROOT, OtherProcess, forge_ledger, sem_value

TRY_CLAIM = """
import sys
from ipc.errors import NamespaceBusy
from ipc.namespace import NamespaceClaim
try:
    with NamespaceClaim(sys.argv[1], global_cap=None):
        print("claimed")
except NamespaceBusy as exc:
    print("busy", exc)
"""


def try_claim_elsewhere(namespace: str) -> str:
    """Try to claim ``namespace`` from a fresh Python process; its one line of output."""
    result = subprocess.run(
        [sys.executable, "-c", TRY_CLAIM, namespace],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.strip()


def test_claim_creates_the_change_counter_and_global_gate(ipc_namespace: str) -> None:
    with NamespaceClaim(ipc_namespace, global_cap=5):
        assert list_semaphores(ipc_namespace) == sorted(
            [generation_name(ipc_namespace), global_gate_name(ipc_namespace, 5)]
        )
        assert sem_value(generation_name(ipc_namespace)) == 0
        assert sem_value(global_gate_name(ipc_namespace, 5)) == 5
        assert lock_path(ipc_namespace).exists()


def test_claim_without_a_global_cap_creates_only_the_counter(ipc_namespace: str) -> None:
    with NamespaceClaim(ipc_namespace, global_cap=None):
        assert list_semaphores(ipc_namespace) == [generation_name(ipc_namespace)]


def test_claim_refuses_an_invalid_namespace() -> None:
    with pytest.raises(InvalidName):
        NamespaceClaim("a/b", global_cap=None)


def test_second_claim_in_this_process_is_busy(ipc_namespace: str) -> None:
    with NamespaceClaim(ipc_namespace, global_cap=3):
        with pytest.raises(NamespaceBusy):
            NamespaceClaim(ipc_namespace, global_cap=3).claim()
        # The refused claim touched nothing of the holder's.
        assert sem_value(global_gate_name(ipc_namespace, 3)) == 3


def test_claim_from_another_process_is_busy_while_held(ipc_namespace: str) -> None:
    with NamespaceClaim(ipc_namespace, global_cap=3):
        assert try_claim_elsewhere(ipc_namespace).startswith("busy")
    assert try_claim_elsewhere(ipc_namespace) == "claimed"


def test_claim_here_is_busy_while_another_process_holds_it(
    ipc_namespace: str, spawn: Callable[..., OtherProcess]
) -> None:
    launcher = spawn("launcher", global_cap=3)
    with pytest.raises(NamespaceBusy, match=f"pid {launcher.pid}"):
        NamespaceClaim(ipc_namespace, global_cap=3).claim()
    assert launcher.exit() == 0
    assert shm_leftovers(ipc_namespace) == []
    with NamespaceClaim(ipc_namespace, global_cap=3):
        pass


def test_claim_after_a_killed_launcher_purges_its_run(
    ipc_namespace: str, spawn: Callable[..., OtherProcess]
) -> None:
    launcher = spawn("launcher", global_cap=4)
    worker = spawn("worker", global_cap=4)
    assert worker.admit(uuid.uuid4(), 1, 2) == {"admitted": True}
    launcher.kill()
    worker.kill()
    assert sem_value(global_gate_name(ipc_namespace, 4)) == 3
    with NamespaceClaim(ipc_namespace, global_cap=4):  # the kernel dropped the dead one's lock
        assert sem_value(global_gate_name(ipc_namespace, 4)) == 4
        assert list_ledgers(ipc_namespace) == []


def test_claim_purges_stale_objects_of_an_earlier_run(ipc_namespace: str) -> None:
    stale_counter = generation_name(ipc_namespace)
    stale_global = global_gate_name(ipc_namespace, 4)
    old_global = global_gate_name(ipc_namespace, 9)  # an earlier run with another cap
    stale_credential = credential_gate_name(ipc_namespace, uuid.uuid4())
    for name, value in [
        (stale_counter, 7),
        (stale_global, 1),
        (old_global, 0),
        (stale_credential, 0),
    ]:
        posix_ipc.Semaphore(name, posix_ipc.O_CREX, initial_value=value).close()
    stale_ledger = forge_ledger(
        ipc_namespace, pid=999_999_999, start_time=1, holdings={stale_global: 3}
    )
    apply_cap(ipc_namespace, uuid.uuid4(), version=1, cap=2)  # a credential's three objects
    # A namespace whose name merely starts with ours is someone else's.
    neighbour = generation_name(ipc_namespace + "x")
    posix_ipc.Semaphore(neighbour, posix_ipc.O_CREX, initial_value=2).close()
    try:
        with NamespaceClaim(ipc_namespace, global_cap=4):
            assert list_semaphores(ipc_namespace) == sorted([stale_counter, stale_global])
            assert sem_value(stale_counter) == 0
            assert sem_value(stale_global) == 4
            assert list_ledgers(ipc_namespace) == []
            assert list_cap_records(ipc_namespace) == []
            assert read_ledger(stale_ledger) is None
            assert sem_value(neighbour) == 2
    finally:
        unlink_semaphore(neighbour)


def test_release_leaves_nothing_behind(ipc_namespace: str) -> None:
    claim = NamespaceClaim(ipc_namespace, global_cap=GLOBAL_CAP)
    claim.claim()
    ledger = Ledger(ipc_namespace, slots=8)
    keeper = Gatekeeper(ipc_namespace, global_cap=GLOBAL_CAP, ledger=ledger)
    permit = keeper.admit(keeper.credential_gate(uuid.uuid4(), 1, 2))
    assert isinstance(permit, Permit)
    keeper.close()
    ledger.close()  # still holding: the ledger stays for the reaper
    assert list_ledgers(ipc_namespace) == [ledger.name]
    assert len(list_semaphores(ipc_namespace)) == 4  # counter, global, credential and its debt
    claim.release()
    assert shm_leftovers(ipc_namespace) == []
    assert not lock_path(ipc_namespace).exists()
    claim.release()  # twice is harmless


def test_gatekeeper_needs_a_claimed_namespace(ipc_namespace: str) -> None:
    ledger = Ledger(ipc_namespace, slots=4)
    try:
        with pytest.raises(NamespaceMissing):
            Gatekeeper(ipc_namespace, global_cap=None, ledger=ledger)
        with NamespaceClaim(ipc_namespace, global_cap=4):
            with pytest.raises(NamespaceMissing, match="global gate"):
                Gatekeeper(ipc_namespace, global_cap=5, ledger=ledger)
            Gatekeeper(ipc_namespace, global_cap=4, ledger=ledger).close()
    finally:
        ledger.close()


def test_purge_counts_what_it_removed(ipc_namespace: str) -> None:
    posix_ipc.Semaphore(generation_name(ipc_namespace), posix_ipc.O_CREX).close()
    forge_ledger(ipc_namespace, pid=1, start_time=1, holdings={})
    assert purge(ipc_namespace) == 2
    assert purge(ipc_namespace) == 0


def test_bump_generations_reaches_running_namespaces_only(ipc_namespace: str) -> None:
    assert bump_generation(ipc_namespace) is False
    with NamespaceClaim(ipc_namespace, global_cap=None):
        assert list_namespaces(ipc_namespace) == [ipc_namespace]
        assert bump_generation(ipc_namespace) is True
        missing = ipc_namespace + "missing"
        assert bump_generations(ipc_namespace, explicit=missing) == [ipc_namespace]
        assert sem_value(generation_name(ipc_namespace)) == 2
