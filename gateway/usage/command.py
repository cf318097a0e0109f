"""``gateway usage``: every user's token usage for operators, as a table or JSON lines."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import click
import msgspec

from gateway.settings import Settings, SettingsError
from gateway.usage.report import (
    GROUPS,
    RangeError,
    UsageReport,
    UsageRow,
    check_range,
    floor_hour,
    parse_group,
    parse_since,
    summarize,
)
from storage import repository
from storage.engine import connected
from storage.errors import StorageError
from storage.usage import COUNTS, usage_between

_HEADERS = ("requests", "rejected", "input", "output", "cache write", "cache read")


@click.command("usage")
@click.option("--user", "user_name", default=None, help="Only this user (default: all users).")
@click.option(
    "--since",
    default="7d",
    show_default=True,
    help="How far back: 7d, 24h (back from now, to the hour below), or an ISO-8601 date or "
    "date-time (UTC unless it names an offset).",
)
@click.option(
    "--by",
    "group_by",
    type=click.Choice(GROUPS),
    default="day",
    show_default=True,
    help="One row per UTC day, UTC hour, model or user.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per row, then the totals.")
def usage_command(user_name: str | None, since: str, group_by: str, as_json: bool) -> None:
    """Token usage per user as the upstream reported it: requests, 429 rejections, input,
    output and cache tokens, up to now.

    Workers write their totals every GATEWAY_USAGE_FLUSH_INTERVAL seconds (default 2), so
    the last seconds of a running gateway may not show yet.
    """
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    now = datetime.now(UTC)
    try:
        start = parse_since(since, now)
        until = floor_hour(now) + timedelta(hours=1)  # this hour included
        check_range(start, until, names=("--since", "now"))
        group = parse_group(group_by, allowed=GROUPS, name="--by")
    except RangeError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        report = asyncio.run(_report(settings, user_name, start, until, group))
    except StorageError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        for row in report.rows:
            click.echo(msgspec.json.encode(row))
        click.echo(msgspec.json.encode({"totals": report.totals}))
        return
    click.echo(
        f"usage from {start.isoformat()} to now, by {group}"
        + (f", user {user_name}" if user_name else ", all users")
    )
    for line in _table(report, group):
        click.echo(line)


async def _report(
    settings: Settings, user_name: str | None, since: datetime, until: datetime, group: str
) -> UsageReport:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    async with connected(settings.database_url):
        user_id = None
        if user_name is not None:
            user = await repository.get_user(user_name)
            if user is None:
                raise click.ClickException(f"no user named {user_name!r}")
            user_id = user.id
        records = await usage_between(since, until, user_id=user_id)
    return summarize(records, group)  # type: ignore[arg-type]


def _label(row: UsageRow, group: str) -> str:
    value = getattr(row, group)
    if group == "hour":
        return str(value.strftime("%Y-%m-%d %H:00"))
    if group == "model" and value == "":
        return "(none)"
    return str(value)


def _table(report: UsageReport, group: str) -> list[str]:
    header = (group, *_HEADERS)
    cells = [
        (_label(row, group), *(f"{getattr(row, name):,}" for name in COUNTS)) for row in report.rows
    ]
    cells.append(("total", *(f"{getattr(report.totals, name):,}" for name in COUNTS)))
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    lines = []
    for line in [header, *cells]:
        left = line[0].ljust(widths[0])
        right = [line[i].rjust(widths[i]) for i in range(1, len(header))]
        lines.append("  ".join([left, *right]).rstrip())
    return lines
