"""``gateway caps --watch``: the running gateway's caps refreshed in place, like ``top``.

Global in use / cap, then every credential with in use / cap and its rejections in the
last minute, busiest first. The rejections come from the workers' own counters (the
Prometheus files of the gateway's namespace, the ones ``/metrics`` serves), read each
refresh and differenced over the last 60 seconds the watch has seen; with the metrics
endpoint off (``--metrics-port 0``) the workers count nothing and the column shows ``-``.
On a terminal the view is a ``rich`` table redrawn in place; otherwise each refresh is
printed as plain text (or JSON lines with ``--json``), so it can be logged or piped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Final

import click
import msgspec
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from gateway.cli import _cap_rows, _CapRow
from gateway.metrics.catalog import REJECTIONS
from gateway.metrics.folder import MetricsFolder
from ipc.namespace import held_by_ledgers, launcher_pid
from storage import repository
from storage.engine import connected

WINDOW: Final = 60.0

Totals = dict[tuple[str, str], float]


def rejection_totals(namespace: str) -> Totals | None:
    """Rejections so far by (scope, user id), from the workers' counters; None when the
    gateway's metrics are off (no folder)."""
    try:
        metrics = MetricsFolder.of(namespace).collect()
    except FileNotFoundError:
        return None
    totals: Totals = {}
    for metric in metrics:
        if metric.name != REJECTIONS:
            continue
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                key = (sample.labels.get("scope", ""), sample.labels.get("user", ""))
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


class RecentRejections:
    """What the counters rose by over the last ``window`` seconds of readings (or since
    the watch began, while it is younger): Prometheus's ``increase()``, over what one
    watch has read. A counter lower than at the reading before means the gateway
    restarted and began again from 0."""

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self._last: tuple[float, Totals] | None = None
        # (previous reading's time, this reading's time, the rise between them)
        self._steps: collections.deque[tuple[float, float, Totals]] = collections.deque()

    def add(self, now: float, totals: Totals) -> tuple[Totals, float]:
        """Record a reading; the rise per key over the window and the seconds covered."""
        if self._last is not None:
            since, before = self._last
            rise = {}
            for key, value in totals.items():
                old = before.get(key, 0.0)
                rise[key] = value - old if value >= old else value
            self._steps.append((since, now, rise))
        self._last = (now, totals)
        steps = self._steps
        while steps and steps[0][1] <= now - self.window:
            steps.popleft()
        recent: Totals = {}
        for _since, _at, rise in steps:
            for key, value in rise.items():
                recent[key] = recent.get(key, 0.0) + value
        return recent, (now - steps[0][0]) if steps else 0.0


class WatchRow(msgspec.Struct, frozen=True):
    """A ``gateway caps --json`` row with the watch's rejections (None: metrics off)."""

    row: _CapRow
    rejected_recently: int | None
    window_seconds: float


def watch_rows(
    namespace: str, keys: list[repository.KeyCap], window: RecentRejections, now: float
) -> list[WatchRow]:
    rows = _cap_rows(namespace, keys)
    if not any(row.scope == "global" for row in rows):
        # No global cap: no gate to read; what is in flight is in the workers' ledgers.
        in_use = sum(held_by_ledgers(namespace).values())
        rows.insert(
            0,
            _CapRow(
                namespace=namespace,
                name="",
                scope="global",
                user_id=None,
                user=None,
                cap=0,
                in_use=in_use,
                free=0,
                to_drain=0,
                held_by_live_workers=in_use,
            ),
        )
    return with_rejections(rows, rejection_totals(namespace), window, now)


def with_rejections(
    rows: list[_CapRow], totals: Totals | None, window: RecentRejections, now: float
) -> list[WatchRow]:
    """Each row with what was refused on it in the window (None: the metrics are off)."""
    if totals is None:
        return [WatchRow(row, None, 0.0) for row in rows]
    recent, seconds = window.add(now, totals)
    out = []
    for row in rows:
        if row.scope == "global":
            # Refused by the global cap (or a worker's full ledger), whoever sent them.
            count = sum(v for (scope, _), v in recent.items() if scope in ("global", "worker"))
        else:
            count = recent.get(("credential", row.user_id or ""), 0.0)
        out.append(WatchRow(row, round(count), seconds))
    return out


def _cells(item: WatchRow) -> tuple[str, ...]:
    row = item.row
    unlimited = row.scope == "global" and not row.name
    return (
        row.scope,
        row.user or "-",
        str(row.in_use),
        "none" if unlimited else str(row.cap),
        "-" if unlimited else str(row.free),
        str(row.to_drain) if row.to_drain else "-",
        "-" if item.rejected_recently is None else str(item.rejected_recently),
    )


def _rejected_header(rows: list[WatchRow]) -> str:
    seconds = max((row.window_seconds for row in rows), default=0.0)
    if seconds >= WINDOW - 0.5:
        return "rejected (last min)"
    return f"rejected (last {seconds:.0f} s)"


_HEADER: Final = ("scope", "user", "in use", "cap", "free", "to drain")


def rich_view(views: list[tuple[str, list[WatchRow]]], stamp: str) -> RenderableType:
    parts: list[RenderableType] = []
    for title, rows in views:
        table = Table(title=title, title_justify="left", caption=stamp, caption_justify="left")
        for index, name in enumerate((*_HEADER, _rejected_header(rows))):
            table.add_column(name, justify="left" if index < 2 else "right")
        for row in rows:
            table.add_row(*_cells(row), style="bold" if row.row.scope == "global" else None)
        parts.append(table)
    return Group(*parts)


def plain_view(views: list[tuple[str, list[WatchRow]]], stamp: str) -> list[str]:
    lines = [f"-- {stamp}"]
    for title, rows in views:
        lines.append(title)
        cells = [(*_HEADER, _rejected_header(rows)), *(_cells(row) for row in rows)]
        widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
        for line in cells:
            left = [line[i].ljust(widths[i]) for i in (0, 1)]
            right = [line[i].rjust(widths[i]) for i in range(2, len(line))]
            lines.append("  ".join(left + right).rstrip())
    return lines


def run_watch(
    database_url: str,
    find: Callable[[], list[str]],
    *,
    interval: float,
    as_json: bool,
    where: str,
) -> None:
    """Refresh until Ctrl-C (which exits cleanly, status 0)."""
    windows: dict[str, RecentRejections] = {}
    terminal = sys.stdout.isatty() and not as_json
    console = Console()

    def snapshot(keys: list[repository.KeyCap]) -> list[tuple[str, list[WatchRow]]]:
        now = time.monotonic()
        views = []
        for namespace in find():
            window = windows.setdefault(namespace, RecentRejections())
            title = f"gateway namespace {namespace} (launcher pid {launcher_pid(namespace)})"
            views.append((title, watch_rows(namespace, keys, window, now)))
        return views

    async def loop() -> None:
        async with connected(database_url, migrated=False):
            if terminal:
                with Live(console=console, auto_refresh=False, transient=False) as live:
                    while True:
                        views = snapshot(await repository.list_key_caps())
                        live.update(_terminal_view(views, where), refresh=True)
                        await asyncio.sleep(interval)
            while True:
                views = snapshot(await repository.list_key_caps())
                show_plain(views, _stamp(), as_json=as_json, where=where)
                await asyncio.sleep(interval)

    with _until_stopped():
        asyncio.run(loop())


def show_plain(
    views: list[tuple[str, list[WatchRow]]], stamp: str, *, as_json: bool, where: str
) -> None:
    """One refresh when not on a terminal: JSON lines, or the tables as text."""
    if as_json:
        for _title, rows in views:
            for row in rows:
                click.echo(msgspec.json.encode(_json_row(row)))
    elif views:
        for line in plain_view(views, stamp):
            click.echo(line)
    else:
        click.echo(f"-- {stamp}\nno running gateway found ({where})")
    sys.stdout.flush()


@contextlib.contextmanager
def _until_stopped() -> Iterator[None]:
    """Ctrl-C ends a watch cleanly (status 0); so does a reader that went away (``| head``):
    quietly, like any Unix filter."""
    try:
        yield
    except KeyboardInterrupt:
        return
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def run_shared_watch(
    rows: Callable[[], list[_CapRow]],
    local: Callable[[], list[str]],
    *,
    interval: float,
    as_json: bool,
    title: str,
) -> None:
    """``caps --watch`` on Redis gates: every host's leases from ``rows()``; the
    rejections column counts this host's gateways (``local()``: their namespaces), whose
    workers' counters are the only ones on this machine (each host's /metrics has its own)."""
    window = RecentRejections()
    terminal = sys.stdout.isatty() and not as_json
    console = Console()

    def snapshot() -> list[tuple[str, list[WatchRow]]]:
        found = [totals for ns in local() if (totals := rejection_totals(ns)) is not None]
        summed: Totals | None = None
        if found:
            summed = {}
            for totals in found:
                for key, value in totals.items():
                    summed[key] = summed.get(key, 0.0) + value
            title_here = f"{title}; rejections on this host"
        else:
            title_here = title
        return [(title_here, with_rejections(rows(), summed, window, time.monotonic()))]

    with _until_stopped():
        if terminal:
            with Live(console=console, auto_refresh=False, transient=False) as live:
                while True:
                    stamp = f"{_stamp()} · every refresh re-reads Redis · Ctrl-C exits"
                    live.update(rich_view(snapshot(), stamp), refresh=True)
                    time.sleep(interval)
        while True:
            show_plain(snapshot(), _stamp(), as_json=as_json, where="")
            time.sleep(interval)


def _terminal_view(views: list[tuple[str, list[WatchRow]]], where: str) -> RenderableType:
    stamp = f"{_stamp()} · every refresh re-reads the gates · Ctrl-C exits"
    if not views:
        return Text(f"no running gateway found ({where}); still watching\n{stamp}")
    return rich_view(views, stamp)


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _json_row(item: WatchRow) -> dict[str, object]:
    out: dict[str, object] = msgspec.to_builtins(item.row)
    if item.row.scope == "global" and not item.row.name:
        out["cap"] = out["free"] = None  # no global cap
    out["rejected_recently"] = item.rejected_recently
    out["window_seconds"] = round(item.window_seconds, 1)
    return out
