"""A worker's usage: added up in memory on the request path, written in batches off it.

The request path only adds to ints in a dict keyed by (user, UTC hour, model). A task of
the worker's event loop swaps the dict out every ``GATEWAY_USAGE_FLUSH_INTERVAL`` seconds
and adds it to ``usage_hourly`` in one short transaction (an additive upsert, so workers
never overwrite each other), and once more when the worker stops gracefully. While the
database is down the totals are kept (up to ``MAX_PENDING_ROWS`` rows; past that the
oldest hours are dropped, and said so) and the next flush tries again; the outage is
logged once when it starts and once when it ends. A worker killed by SIGKILL loses what
it counted since its last flush: at most one interval (plus whatever an outage kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Final

from gateway.usage.meter import Meter
from storage.errors import StorageError
from storage.usage import UsageDelta, add_usage

log = logging.getLogger("gateway.usage")

DEFAULT_FLUSH_INTERVAL: Final = 2.0
MAX_PENDING_ROWS: Final = 100_000
# A final flush at shutdown waits this long for the database, then gives up (and says so).
SHUTDOWN_FLUSH_TIMEOUT: Final = 10.0

# (user id as its 128-bit int, hour as epoch seconds, model) -> [requests, rejected, input,
# output, cache_creation_input, cache_read_input]. The int: a UUID's hash is a Python call.
Key = tuple[int, int, str]
Rows = dict[Key, list[int]]
Writer = Callable[[Sequence[UsageDelta]], Awaitable[int]]
Taken = Callable[[Rows], None]


class UsageTally:
    """What one worker counted since its last flush. One event loop writes it: no lock."""

    __slots__ = ("_hour", "_next_hour", "rows")

    def __init__(self) -> None:
        self.rows: Rows = {}
        self._hour = 0  # the UTC hour requests end in now, as epoch seconds
        self._next_hour = 0.0

    def _now_hour(self) -> int:
        now = time.time()
        if now >= self._next_hour or now < self._hour:  # a new hour, or the clock went back
            self._hour = int(now) // 3600 * 3600
            self._next_hour = self._hour + 3600
        return self._hour

    def relayed(self, user_id: uuid.UUID, meter: Meter | None) -> None:
        """A request forwarded upstream ended; ``meter``: what its answer reported."""
        now = time.time()
        hour = self._hour if self._hour <= now < self._next_hour else self._now_hour()
        if meter is None:
            key = (user_id.int, hour, "")
            row = self.rows.get(key)
            if row is None:
                row = self.rows[key] = [0, 0, 0, 0, 0, 0]
            row[0] += 1
            return
        key = (user_id.int, hour, meter.model)
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = [0, 0, 0, 0, 0, 0]
        row[0] += 1
        row[2] += meter.input_tokens
        row[3] += meter.output_tokens
        row[4] += meter.cache_creation_input_tokens
        row[5] += meter.cache_read_input_tokens

    def rejected(self, user_id: uuid.UUID) -> None:
        """A request refused with a 429 over a cap (its body is never read: model '')."""
        key = (user_id.int, self._now_hour(), "")
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = [0, 0, 0, 0, 0, 0]
        row[1] += 1

    def take(self) -> Rows:
        rows, self.rows = self.rows, {}
        return rows


class UsageRecorder:
    """A worker's tally and the task that writes it to the database."""

    def __init__(
        self,
        *,
        interval: float = DEFAULT_FLUSH_INTERVAL,
        max_pending: int = MAX_PENDING_ROWS,
        write: Writer = add_usage,
        taken: Taken | None = None,
    ) -> None:
        self.tally = UsageTally()
        # Shown each flush's counts once, when they are taken (the metrics' token counter).
        self._taken = taken
        self.interval = interval
        self.max_pending = max_pending
        self._write = write
        self._pending: Rows = {}  # taken from the tally, not yet written
        self._failing = False
        self._dropped = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    @property
    def pending(self) -> int:
        """Rows kept for the next flush (the database was down)."""
        return len(self._pending)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the task and write what is left: a graceful stop loses nothing."""
        # Not cancelled: a flush cut between its commit and its return would be written
        # twice; the task ends after the flush it is in.
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None
        try:
            async with asyncio.timeout(SHUTDOWN_FLUSH_TIMEOUT):
                written = await self.flush()
        except TimeoutError:
            written = False
        if not written:
            log.error(
                "usage of %d (user, hour, model) rows is lost: the database did not take "
                "the final flush",
                len(self._pending),
            )

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval)
            if self._stopping.is_set():
                return
            try:
                await self.flush()
            except Exception:  # nothing may stop the counting
                log.exception("flushing usage failed unexpectedly")

    async def flush(self) -> bool:
        """Write the tally (and whatever an earlier failed flush kept); True when written."""
        taken = self.tally.take()
        if taken and self._taken is not None:
            try:
                self._taken(taken)
            except Exception:  # the database's counts come first
                log.exception("usage could not be shown to the metrics")
        _merge(self._pending, taken)
        if not self._pending:
            return True
        deltas = [
            UsageDelta(
                user_id=uuid.UUID(int=user_id),
                hour=datetime.fromtimestamp(hour, UTC),
                model=model,
                requests=row[0],
                rejected=row[1],
                input_tokens=row[2],
                output_tokens=row[3],
                cache_creation_input_tokens=row[4],
                cache_read_input_tokens=row[5],
            )
            for (user_id, hour, model), row in self._pending.items()
        ]
        try:
            await self._write(deltas)
        except StorageError as exc:
            if not self._failing:
                self._failing = True
                log.warning(
                    "usage cannot be written (%s); keeping it in memory and retrying every %g s",
                    exc,
                    self.interval,
                )
            self._bound()
            return False
        if self._failing:
            self._failing = False
            log.warning(
                "usage written again after an outage (%d rows kept meanwhile, %d dropped)",
                len(self._pending),
                self._dropped,
            )
            self._dropped = 0
        self._pending = {}
        return True

    def _bound(self) -> None:
        """Past ``max_pending`` rows, the oldest hours go first (and the loss is logged)."""
        excess = len(self._pending) - self.max_pending
        if excess <= 0:
            return
        oldest = sorted(self._pending, key=lambda key: key[1])[:excess]
        for key in oldest:
            del self._pending[key]
        if not self._dropped:
            log.error(
                "usage kept during the database outage exceeds %d rows; dropping the oldest",
                self.max_pending,
            )
        self._dropped += excess


def _merge(into: Rows, rows: Rows) -> None:
    if not into:
        into.update(rows)
        return
    for key, row in rows.items():
        kept = into.get(key)
        if kept is None:
            into[key] = row
        else:
            for index, value in enumerate(row):
                kept[index] += value
