"""A worker's ledger in real shared memory: counts, slots, closing, process start times."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import posix_ipc
import pytest

from ipc.errors import LedgerFull
from ipc.ledger import Holding, Ledger, process_start_time, read_ledger, unlink_ledger
from ipc.naming import list_ledgers

# Gate-like names of different lengths, so a reused slot must overwrite a longer name.
LONG = "/x.c." + "a" * 32 + ".123456789.256"
SHORT = "/x.g.8"
OTHER = "/x.c." + "b" * 32 + ".1.4"


def counts(name: str) -> dict[str, int]:
    snapshot = read_ledger(name)
    assert snapshot is not None
    return {holding.name: holding.count for holding in snapshot.holdings}


def test_record_and_unrecord_are_visible_through_read_ledger(ipc_namespace: str) -> None:
    ledger = Ledger(ipc_namespace, slots=8)
    try:
        ledger.record(LONG)
        ledger.record(LONG)
        ledger.record(SHORT)
        snapshot = read_ledger(ledger.name)
        assert snapshot is not None
        assert snapshot.pid == os.getpid()
        assert snapshot.start_time == process_start_time(os.getpid())
        assert counts(ledger.name) == {LONG: 2, SHORT: 1} == ledger.held()

        ledger.unrecord(LONG)
        assert counts(ledger.name) == {LONG: 1, SHORT: 1} == ledger.held()
        ledger.unrecord(LONG)
        ledger.unrecord(SHORT)
        assert counts(ledger.name) == {} == ledger.held()
    finally:
        ledger.close()


def test_header_only_read_skips_holdings(ipc_namespace: str) -> None:
    ledger = Ledger(ipc_namespace, slots=4)
    try:
        ledger.record(SHORT)
        snapshot = read_ledger(ledger.name, with_holdings=False)
        assert snapshot is not None
        assert (snapshot.pid, snapshot.holdings) == (os.getpid(), [])
    finally:
        ledger.unrecord(SHORT)
        ledger.close()


def test_a_slot_is_reused_once_its_count_is_back_to_zero(ipc_namespace: str) -> None:
    ledger = Ledger(ipc_namespace, slots=2)
    try:
        ledger.record(LONG)
        ledger.record(SHORT)
        with pytest.raises(LedgerFull):
            ledger.record(OTHER)
        ledger.unrecord(LONG)
        ledger.record(OTHER)  # takes the freed slot
        snapshot = read_ledger(ledger.name)
        assert snapshot is not None
        # A slot's operation counter keeps growing across reuse: the audit sees a change.
        assert sorted(snapshot.holdings, key=lambda h: h.slot) == [
            Holding(slot=0, name=OTHER, count=1, ops=3),
            Holding(slot=1, name=SHORT, count=1, ops=1),
        ]
    finally:
        ledger.close()


def test_every_record_and_unrecord_moves_the_slot_operation_counter(ipc_namespace: str) -> None:
    ledger = Ledger(ipc_namespace, slots=2)
    try:
        ledger.record(SHORT)
        ledger.record(SHORT)
        ledger.unrecord(SHORT)
        ledger.record(SHORT)
        snapshot = read_ledger(ledger.name)
        assert snapshot is not None
        # Back at a count of 2, but four operations later: the audit does not mistake it
        # for a gate that stood still.
        assert snapshot.holdings == [Holding(slot=0, name=SHORT, count=2, ops=4)]
    finally:
        ledger.close()


def test_ledger_full_leaves_the_ledger_unchanged(ipc_namespace: str) -> None:
    ledger = Ledger(ipc_namespace, slots=1)
    try:
        ledger.record(SHORT)
        with pytest.raises(LedgerFull):
            ledger.record(LONG)
        ledger.record(SHORT)  # a name that already has a slot still fits
        assert ledger.held() == {SHORT: 2} == counts(ledger.name)
    finally:
        ledger.close()


def test_close_unlinks_an_empty_ledger(ipc_namespace: str) -> None:
    ledger = Ledger(ipc_namespace, slots=4)
    ledger.record(SHORT)
    ledger.unrecord(SHORT)
    assert list_ledgers(ipc_namespace) == [ledger.name]
    ledger.close()
    assert list_ledgers(ipc_namespace) == []
    assert read_ledger(ledger.name) is None
    ledger.close()  # twice is harmless


def test_close_keeps_a_ledger_that_still_holds_permits(ipc_namespace: str) -> None:
    ledger = Ledger(ipc_namespace, slots=4)
    ledger.record(SHORT)
    ledger.close()
    try:
        assert list_ledgers(ipc_namespace) == [ledger.name]
        assert counts(ledger.name) == {SHORT: 1}
    finally:
        unlink_ledger(ledger.name)


def test_read_ledger_is_none_for_missing_and_foreign_objects(ipc_namespace: str) -> None:
    assert read_ledger(f"/{ipc_namespace}.l.1") is None
    name = f"/{ipc_namespace}.l.2"
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=4096)  # zeros: no magic
    shm.close_fd()
    try:
        assert read_ledger(name) is None
    finally:
        unlink_ledger(name)


def test_process_start_time_of_this_process() -> None:
    start = process_start_time(os.getpid())
    assert start is not None
    assert start > 0
    assert process_start_time(os.getpid()) == start


def test_process_start_time_of_a_dead_pid_is_none() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(10)
    assert process_start_time(child.pid) is None


def test_process_start_time_of_a_zombie_is_none() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_start_time(child.pid) is not None
        os.kill(child.pid, signal.SIGKILL)
        # Not yet waited for: the pid is a zombie until wait() below.
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        assert process_start_time(child.pid) is None
    finally:
        child.kill()
        child.wait(10)
