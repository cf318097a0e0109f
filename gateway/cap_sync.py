"""The launcher's cap sync: applies committed cap changes that no worker applied.

A worker resizes a credential's gate right after it commits a cap change, and the
command line does the same for a running gateway. A process killed between its commit
and its resize (or in the middle of one) would leave the gate at the old cap, and every
worker's cache holding the old row, until the next change. This thread closes that
window: it watches the database's latest cap version, and when it moves (and every
``full_every`` seconds regardless) applies every stored cap newer than the one its gate
records; it finishes any resize a killed process left half-done; it removes the gates of deleted
users once no worker holds a permit of them; and when it had to change a cap it bumps
the change counter so that every worker reloads.

Its event loop holds the launcher's one database engine (Piccolo binds tables to one
engine per process), so other launcher threads run their queries on it with ``call``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ipc.caps import apply_cap, has_deleted, read_records, resume_resize, sweep_deleted
from ipc.namespace import bump_generation, held_by_ledgers
from storage import repository
from storage.engine import connected
from storage.errors import StorageError

log = logging.getLogger("gateway.cap_sync")

T = TypeVar("T")


class CapSync(threading.Thread):
    def __init__(
        self,
        namespace: str,
        database_url: str,
        *,
        interval: float = 1.0,
        full_every: float = 10.0,
        posix: bool = True,
    ) -> None:
        super().__init__(name=f"cap-sync-{namespace}", daemon=True)
        self.namespace = namespace
        self.database_url = database_url
        self.interval = interval
        self.full_every = full_every
        # False with shared gates (Redis): no semaphores to keep; the thread only hosts
        # the launcher's database connection (``call``).
        self.posix = posix
        self._stop_event = threading.Event()
        self._latest = -1
        self._last_full = 0.0
        self._down = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def run(self) -> None:
        asyncio.run(self._run())

    def call(self, work: Callable[[], Coroutine[Any, Any, T]], *, timeout: float) -> T:
        """Run ``work()`` on this thread's loop, with its database, and wait for it
        (from another thread). Raises ``StorageError`` when the database is not open,
        or ``TimeoutError``; whatever ``work`` raises comes through."""
        loop = self._loop
        if loop is None or self._stop_event.is_set():
            raise StorageError("the launcher's database connection is not open")
        coroutine = work()
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        except RuntimeError:  # the loop closed after our look at it
            coroutine.close()
            raise StorageError("the launcher's database connection is not open") from None
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"the database did not answer within {timeout:g} s") from None

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)

    async def _run(self) -> None:
        try:
            async with connected(self.database_url, migrated=False):
                self._loop = asyncio.get_running_loop()
                try:
                    await self._loop_until_stopped()
                finally:
                    self._loop = None
        except StorageError as exc:
            log.error("cap sync could not open the database: %s", exc)

    async def _loop_until_stopped(self) -> None:
        while not self._stop_event.is_set():
            try:
                await self.sync_once()
            except StorageError as exc:
                if not self._down:
                    log.warning("cap sync cannot read the database: %s", exc)
                self._down = True
            except Exception:
                log.exception("cap sync pass failed")
            await asyncio.to_thread(self._stop_event.wait, self.interval)

    async def sync_once(self) -> int:
        """One pass; the number of gates it had to change."""
        if not self.posix:
            return 0
        changed = sum(resume_resize(self.namespace, user) for user in self._half_done())
        if has_deleted(self.namespace):
            sweep_deleted(self.namespace, held_by_ledgers(self.namespace))
        latest = await repository.latest_cap_version()
        now = time.monotonic()
        if self._down:
            log.info("cap sync reads the database again")
            self._down = False
        if latest != self._latest or now - self._last_full >= self.full_every:
            self._latest, self._last_full = latest, now
            records = read_records(self.namespace)
            for key in await repository.list_key_caps():
                record = records.get(key.user_id)
                if record is not None and key.cap_version > record.version:
                    apply_cap(
                        self.namespace,
                        key.user_id,
                        version=key.cap_version,
                        cap=key.max_concurrent,
                        create=False,
                    )
                    log.warning(
                        "applied a committed cap change no worker had applied",
                        extra={"user_id": str(key.user_id), "cap_value": key.max_concurrent},
                    )
                    changed += 1
        if changed:
            bump_generation(self.namespace)
        return changed

    def _half_done(self) -> list[uuid.UUID]:
        records = read_records(self.namespace).items()
        return [user for user, record in records if record.cap != record.applied]
