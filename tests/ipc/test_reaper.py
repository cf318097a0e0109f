"""The reaper gives back the permits of workers killed while holding them, exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable

from ipc.gates import Gatekeeper, Permit, unlink_semaphore
from ipc.ledger import Ledger, process_start_time, read_ledger
from ipc.namespace import NamespaceClaim
from ipc.naming import credential_gate_name, global_gate_name, ledger_name, list_ledgers
from ipc.reaper import Reaped, Reaper, reap_once
from tests.ipc.conftest import GLOBAL_CAP, OtherProcess, forge_ledger, sem_value, take, wait_for


def values(*names: str) -> list[int]:
    return [sem_value(name) for name in names]


def test_reap_once_gives_back_exactly_what_a_killed_worker_held(
    claim: NamespaceClaim, spawn: Callable[..., OtherProcess]
) -> None:
    ns = claim.namespace
    worker = spawn()
    user, other_user, k = uuid.uuid4(), uuid.uuid4(), 3
    for _ in range(k):
        assert worker.admit(user, 2, 5) == {"admitted": True}
    assert worker.admit(other_user, 1, 2) == {"admitted": True}
    credential = credential_gate_name(ns, user)
    other = credential_gate_name(ns, other_user)
    global_gate = global_gate_name(ns, GLOBAL_CAP)
    worker.kill()
    assert values(credential, other, global_gate) == [5 - k, 1, GLOBAL_CAP - k - 1]

    assert reap_once(ns) == [
        Reaped(pid=worker.pid, returned={credential: k, other: 1, global_gate: k + 1})
    ]
    assert values(credential, other, global_gate) == [5, 2, GLOBAL_CAP]
    assert list_ledgers(ns) == []
    assert read_ledger(ledger_name(ns, worker.pid)) is None

    assert reap_once(ns) == []
    assert values(credential, other, global_gate) == [5, 2, GLOBAL_CAP]


def test_a_zombie_worker_is_dead_to_the_reaper(
    claim: NamespaceClaim, spawn: Callable[..., OtherProcess]
) -> None:
    worker = spawn()
    assert worker.admit(uuid.uuid4(), 1, 1) == {"admitted": True}
    os.kill(worker.pid, signal.SIGKILL)
    os.waitid(os.P_PID, worker.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet waited for
    [reaped] = reap_once(claim.namespace)
    assert reaped.pid == worker.pid
    assert sum(reaped.returned.values()) == 2
    assert sem_value(global_gate_name(claim.namespace, GLOBAL_CAP)) == GLOBAL_CAP


def test_live_workers_are_never_reaped(
    gatekeeper: Gatekeeper, spawn: Callable[..., OtherProcess]
) -> None:
    ns = gatekeeper.namespace
    worker = spawn()
    user = uuid.uuid4()
    assert worker.admit(user, 1, 4) == {"admitted": True}
    assert worker.admit(user, 1, 4) == {"admitted": True}
    permit = gatekeeper.admit(gatekeeper.credential_gate(user, 1, 4))  # this process holds one
    assert isinstance(permit, Permit)
    credential = credential_gate_name(ns, user)
    global_gate = global_gate_name(ns, GLOBAL_CAP)
    ledgers = sorted([ledger_name(ns, worker.pid), gatekeeper.ledger.name])

    for _ in range(3):
        assert reap_once(ns) == []
        assert values(credential, global_gate) == [1, GLOBAL_CAP - 3]
        assert list_ledgers(ns) == ledgers
    assert worker.request("held") == {credential: 2, global_gate: 2}

    worker.kill()  # the same checks now find it, so the test above could fail
    assert reap_once(ns) == [Reaped(pid=worker.pid, returned={credential: 2, global_gate: 2})]
    assert list_ledgers(ns) == [gatekeeper.ledger.name]
    assert isinstance(permit, Permit)
    permit.release()


def test_a_worker_that_exits_cleanly_leaves_nothing_to_reap(
    claim: NamespaceClaim, spawn: Callable[..., OtherProcess]
) -> None:
    worker = spawn()
    assert worker.admit(uuid.uuid4(), 1, 2) == {"admitted": True}
    assert worker.exit() == 0
    assert list_ledgers(claim.namespace) == []
    assert reap_once(claim.namespace) == []
    assert sem_value(global_gate_name(claim.namespace, GLOBAL_CAP)) == GLOBAL_CAP


def test_a_gate_unlinked_meanwhile_is_not_created_again(
    claim: NamespaceClaim, spawn: Callable[..., OtherProcess]
) -> None:
    ns = claim.namespace
    worker = spawn()
    user = uuid.uuid4()
    for _ in range(2):
        assert worker.admit(user, 1, 3) == {"admitted": True}
    worker.kill()
    credential = credential_gate_name(ns, user)
    global_gate = global_gate_name(ns, GLOBAL_CAP)
    assert unlink_semaphore(credential)  # the user was deleted meanwhile

    assert reap_once(ns) == [Reaped(pid=worker.pid, returned={global_gate: 2})]
    assert unlink_semaphore(credential) is False  # still gone
    assert sem_value(global_gate) == GLOBAL_CAP
    assert list_ledgers(ns) == []


def test_the_reaper_thread_reaps_on_its_own(
    claim: NamespaceClaim, spawn: Callable[..., OtherProcess]
) -> None:
    ns = claim.namespace
    user = uuid.uuid4()
    credential = credential_gate_name(ns, user)
    global_gate = global_gate_name(ns, GLOBAL_CAP)
    reaper = Reaper(ns)  # the default interval
    reaper.start()
    try:
        worker = spawn()
        for _ in range(2):
            assert worker.admit(user, 1, 2) == {"admitted": True}
        assert values(credential, global_gate) == [0, GLOBAL_CAP - 2]
        worker.kill()
        assert wait_for(
            lambda: list_ledgers(ns) == [] and values(credential, global_gate) == [2, GLOBAL_CAP],
            timeout=3.0,
        ), (list_ledgers(ns), values(credential, global_gate))
    finally:
        reaper.stop()
    assert not reaper.is_alive()
    assert values(credential, global_gate) == [2, GLOBAL_CAP]


def test_a_live_pid_with_another_start_time_is_dead(claim: NamespaceClaim) -> None:
    ns = claim.namespace
    global_gate = global_gate_name(ns, GLOBAL_CAP)
    # A live process that now has the pid; the ledger's writer was an earlier one.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = process_start_time(sleeper.pid)
        assert start is not None
        take(global_gate, 2)
        forge_ledger(ns, pid=sleeper.pid, start_time=start, holdings={global_gate: 2})
        assert reap_once(ns) == []  # same pid, same start time: its own
        assert sem_value(global_gate) == GLOBAL_CAP - 2

        forge_ledger(ns, pid=sleeper.pid, start_time=start - 1, holdings={global_gate: 2})
        assert reap_once(ns) == [Reaped(pid=sleeper.pid, returned={global_gate: 2})]
        assert sem_value(global_gate) == GLOBAL_CAP
        assert list_ledgers(ns) == []
    finally:
        sleeper.kill()
        sleeper.wait(10)


def test_a_reused_pid_does_not_erase_a_dead_workers_permits(claim: NamespaceClaim) -> None:
    ns = claim.namespace
    global_gate = global_gate_name(ns, GLOBAL_CAP)
    start = process_start_time(os.getpid())
    assert start is not None
    take(global_gate, 2)  # held by an earlier process that had our pid, then died
    forge_ledger(ns, pid=os.getpid(), start_time=start - 1, holdings={global_gate: 2})
    ledger = Ledger(ns, slots=4)  # this process starts before the reaper's next pass
    try:
        reap_once(ns)
        assert sem_value(global_gate) == GLOBAL_CAP
    finally:
        ledger.close()
