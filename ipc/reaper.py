"""The launcher's reaper: gives back the permits of workers that died holding them."""

from __future__ import annotations

import logging
import threading

import msgspec
import posix_ipc

from ipc.ledger import process_start_time, read_ledger, set_count, unlink_ledger
from ipc.naming import list_ledgers

log = logging.getLogger("ipc.reaper")


class Reaped(msgspec.Struct, frozen=True):
    pid: int
    returned: dict[str, int]


def reap_once(namespace: str) -> list[Reaped]:
    """Find ledgers whose process is gone, give their permits back, remove the ledgers."""
    reaped = []
    for ledger in list_ledgers(namespace):
        header = read_ledger(ledger, with_holdings=False)
        if header is None:
            continue
        if process_start_time(header.pid) == header.start_time:
            continue  # alive (same pid, same start time)
        snapshot = read_ledger(ledger)
        if snapshot is None:
            continue
        returned: dict[str, int] = {}
        for holding in snapshot.holdings:
            try:
                # No O_CREAT: a name unlinked by a cap change must stay gone.
                sem = posix_ipc.Semaphore(holding.name)
            except posix_ipc.ExistentialError:
                set_count(ledger, holding.slot, 0)
                continue
            try:
                for left in range(holding.count - 1, -1, -1):
                    # Un-record before releasing, as the worker does: a reaper killed
                    # half-way errs towards a lost permit, never an over-release.
                    set_count(ledger, holding.slot, left)
                    sem.release()
                    returned[holding.name] = returned.get(holding.name, 0) + 1
            finally:
                sem.close()
        unlink_ledger(ledger)
        if returned:
            log.warning("worker %d died holding permits; gave back %s", snapshot.pid, returned)
        reaped.append(Reaped(pid=snapshot.pid, returned=returned))
    return reaped


class Reaper(threading.Thread):
    """Runs ``reap_once`` every ``interval`` seconds until stopped."""

    def __init__(self, namespace: str, *, interval: float = 0.2) -> None:
        super().__init__(name=f"reaper-{namespace}", daemon=True)
        self.namespace = namespace
        self.interval = interval
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                reap_once(self.namespace)
            except Exception:  # a bad ledger must not stop the reaper
                log.exception("reaper pass failed")

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
