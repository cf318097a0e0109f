"""A worker's metrics: plain tallies on the request path, flushed into prometheus_client.

prometheus_client's multiprocess values take a lock and write an mmap'd file on every
change, and a labelled child is looked up on every call: measured on this machine kind,
``Counter.labels(...).inc()`` costs about 17 µs and ``Histogram.observe()`` 10-15 µs, so
one request's three updates would cost about 40 µs of the ~200 µs the whole proxied
request takes. The request path therefore only adds to ints in dicts and lists (a bisect
picks the bucket), well under a microsecond, and a task of the worker's event loop moves
the tallies into the prometheus_client values every second (and once more at shutdown).
A worker killed by SIGKILL loses at most its last second of counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Final

from gateway.metrics.catalog import (
    BUCKETS,
    HELP,
    QUEUE_TIMEOUTS,
    QUEUE_WAIT,
    REJECTIONS,
    REQUEST_DURATION,
    REQUESTS,
    TOKEN_KINDS,
    TOKENS,
    UPSTREAM_HEADERS,
)

if TYPE_CHECKING:
    from gateway.usage.recorder import Rows

log = logging.getLogger("gateway.metrics")

FLUSH_INTERVAL: Final = 1.0


class _Buckets:
    """One histogram's observations since the last flush: a count per bucket, and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, as Prometheus's ``le`` means.
        self.counts[bisect_left(BUCKETS, value)] += 1
        self.total += value

    def take(self) -> tuple[list[int], float]:
        counts, total = self.counts, self.total
        self.counts, self.total = [0] * (len(BUCKETS) + 1), 0.0
        return counts, total


class RequestTally:
    """What one worker served since the last flush. One event loop writes it: no lock."""

    __slots__ = (
        "queue_timeouts",
        "queue_waits",
        "rejections",
        "requests",
        "streamed",
        "tokens",
        "unary",
        "upstream_headers",
    )

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.rejections: dict[tuple[str, str], int] = {}
        self.queue_timeouts: dict[str, int] = {}
        # (user id, model) -> tokens by TOKEN_KINDS
        self.tokens: dict[tuple[str, str], list[int]] = {}
        self.streamed = _Buckets()
        self.unary = _Buckets()
        self.upstream_headers = _Buckets()
        self.queue_waits = _Buckets()

    def waited(self, seconds: float, *, timed_out_at: str | None = None) -> None:
        """A request left the line: served, or refused (at ``timed_out_at``'s gate)."""
        self.queue_waits.observe(seconds)
        if timed_out_at is not None:
            timeouts = self.queue_timeouts
            timeouts[timed_out_at] = timeouts.get(timed_out_at, 0) + 1

    def answered(self, outcome: str, status: int) -> None:
        """A request answered without being relayed (refused, failed auth, bad input)."""
        key = (outcome, status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1

    def rejected(self, scope: str, user_id: str) -> None:
        key = (scope, user_id)
        rejections = self.rejections
        rejections[key] = rejections.get(key, 0) + 1

    def tokens_from(self, rows: Rows) -> None:
        """A usage flush's counts (``gateway.usage.recorder``): the tokens of the
        ``/v1/messages`` answers, by user and model (the request path does not count them
        twice; they reach the counter with each usage flush)."""
        tokens = self.tokens
        for (user, _hour, model), row in rows.items():
            if row[2] or row[3] or row[4] or row[5]:
                key = (str(uuid.UUID(int=user)), model)
                counts = tokens.get(key)
                if counts is None:
                    counts = tokens[key] = [0, 0, 0, 0]
                for index in range(4):
                    counts[index] += row[2 + index]

    def relayed(
        self,
        outcome: str,
        status: int,
        *,
        streamed: bool,
        admitted_at: float,
        sent_at: float,
        headers_at: float,
        ended: float,
    ) -> None:
        """An admitted request ended (admitted, sent upstream, its response head, its last
        byte: ``perf_counter`` times); ``headers_at`` is 0 when no response head came."""
        key = (outcome, status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        (self.streamed if streamed else self.unary).observe(ended - admitted_at)
        if headers_at:
            self.upstream_headers.observe(headers_at - sent_at)


class WorkerMetrics:
    """A worker's tally and the task that moves it into prometheus_client's files.

    Built only when ``PROMETHEUS_MULTIPROC_DIR`` is set (the launcher sets it when its
    metrics endpoint is on): prometheus_client picks its multiprocess values from the
    environment when it is first imported, which is why it is imported here and not at
    the top of the module.
    """

    def __init__(self, *, interval: float = FLUSH_INTERVAL) -> None:
        from prometheus_client import Counter, Histogram

        self.tally = RequestTally()
        self.interval = interval
        # registry=None: the launcher collects the workers' files; nothing here serves them.
        self._requests = Counter(REQUESTS, HELP[REQUESTS], ["outcome", "code"], registry=None)
        self._rejections = Counter(REJECTIONS, HELP[REJECTIONS], ["scope", "user"], registry=None)
        duration = Histogram(
            REQUEST_DURATION,
            HELP[REQUEST_DURATION],
            ["streamed"],
            buckets=BUCKETS,
            registry=None,
        )
        self._streamed = _histogram_child(duration.labels(streamed="true"))
        self._unary = _histogram_child(duration.labels(streamed="false"))
        self._upstream_headers = _histogram_child(
            Histogram(UPSTREAM_HEADERS, HELP[UPSTREAM_HEADERS], buckets=BUCKETS, registry=None)
        )
        self._queue_waits = _histogram_child(
            Histogram(QUEUE_WAIT, HELP[QUEUE_WAIT], buckets=BUCKETS, registry=None)
        )
        self._queue_timeouts = Counter(
            QUEUE_TIMEOUTS, HELP[QUEUE_TIMEOUTS], ["scope"], registry=None
        )
        for scope in ("global", "credential"):  # both series from the start, at 0
            self._queue_timeouts.labels(scope)
        # Labelled by user id here; the launcher's collector shows names.
        self._tokens = Counter(TOKENS, HELP[TOKENS], ["user", "model", "kind"], registry=None)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the task and flush what is left (a worker stopping gracefully loses nothing)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.flush()
            except Exception:  # a full disk must not stop the counting
                log.exception("flushing the worker's metrics failed")

    def flush(self) -> None:
        """Add the tallies since the last flush to prometheus_client's values."""
        tally = self.tally
        requests, tally.requests = tally.requests, {}
        rejections, tally.rejections = tally.rejections, {}
        for (outcome, status), count in requests.items():
            self._requests.labels(outcome, str(status)).inc(count)
        for (scope, user_id), count in rejections.items():
            self._rejections.labels(scope, user_id).inc(count)
        tokens, tally.tokens = tally.tokens, {}
        for (user_id, model), counts in tokens.items():
            for kind, count in zip(TOKEN_KINDS, counts, strict=True):
                self._tokens.labels(user_id, model, kind).inc(count)
        timeouts, tally.queue_timeouts = tally.queue_timeouts, {}
        for scope, count in timeouts.items():
            self._queue_timeouts.labels(scope).inc(count)
        for buckets, child in (
            (tally.streamed, self._streamed),
            (tally.unary, self._unary),
            (tally.upstream_headers, self._upstream_headers),
            (tally.queue_waits, self._queue_waits),
        ):
            counts, total = buckets.take()
            if any(counts):
                _add_observations(child, counts, total)


def _histogram_child(child: Any) -> Any:
    """A histogram child whose per-bucket values we can add to in bulk; checked once here,
    so a prometheus_client that changed its insides fails at start, not silently."""
    buckets = getattr(child, "_buckets", None)
    if not isinstance(buckets, list) or len(buckets) != len(BUCKETS) + 1:
        raise RuntimeError("this prometheus_client's Histogram has no per-bucket values")
    if not hasattr(child, "_sum"):
        raise RuntimeError("this prometheus_client's Histogram has no sum value")
    return child


def _add_observations(child: Any, counts: list[int], total: float) -> None:
    """What ``observe`` does once per value, done once per bucket: a multiprocess
    histogram stores each bucket's own count (made cumulative when collected) and the sum."""
    for value, count in zip(child._buckets, counts, strict=True):
        if count:
            value.inc(count)
    child._sum.inc(total)
