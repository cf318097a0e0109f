"""The launcher's reaper: gives back the permits of workers that died holding them, and
runs the drift audit (``ipc.audit``) on the same thread."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import msgspec

from ipc.audit import Audit
from ipc.ledger import drain_dead_ledger, process_start_time, read_ledger
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
        if header is None or process_start_time(header.pid) == header.start_time:
            continue  # gone already, or alive (same pid, same start time)
        returned = drain_dead_ledger(ledger)
        if returned is None:
            continue
        if returned:
            log.warning("worker %d died holding permits; gave back %s", header.pid, returned)
        reaped.append(Reaped(pid=header.pid, returned=returned))
    return reaped


class Reaper(threading.Thread):
    """Runs ``reap_once`` every ``interval`` seconds, and the audit a few times per
    ``audit_interval`` (0: never), until stopped; hands what each pass reaped (often
    nothing) to ``on_reaped`` (the launcher counts it and tidies the dead workers' metrics)."""

    def __init__(
        self,
        namespace: str,
        *,
        interval: float = 0.2,
        audit_interval: float = 2.0,
        on_reaped: Callable[[list[Reaped]], None] | None = None,
    ) -> None:
        super().__init__(name=f"reaper-{namespace}", daemon=True)
        self.namespace = namespace
        self.interval = interval
        self.audit_interval = audit_interval
        self.audit = Audit(namespace, interval=audit_interval)
        self.on_reaped = on_reaped
        self._stop_event = threading.Event()

    def run(self) -> None:
        # The audit reads every gate four times per interval, so a drift is repaired about
        # an interval after the gate went quiet, not up to two.
        audit_every = self.audit_interval / 4
        next_audit = time.monotonic() + audit_every
        while not self._stop_event.wait(self.interval):
            try:
                reaped = reap_once(self.namespace)
            except Exception:  # a bad ledger must not stop the reaper
                log.exception("reaper pass failed")
                reaped = []
            if self.on_reaped is not None:
                try:
                    self.on_reaped(reaped)
                except Exception:
                    log.exception("handling reaped workers failed")
            if self.audit_interval > 0 and time.monotonic() >= next_audit:
                next_audit = time.monotonic() + audit_every
                try:
                    self.audit.run_once()
                except Exception:  # nor a bad gate the audit
                    log.exception("audit pass failed")

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
