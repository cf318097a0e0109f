"""``GET /api/v1/me/usage``: a user's own token usage, by hour, day or model."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from litestar import Controller, Request, get
from litestar.datastructures import State
from litestar.params import Parameter

from gateway.errors import InvalidRequest
from gateway.me_api import _storage_down, authenticated_user
from gateway.usage.report import (
    RangeError,
    UsageReport,
    check_range,
    default_range,
    parse_group,
    parse_instant,
    summarize,
)
from storage.errors import StorageError
from storage.usage import usage_between

API_GROUPS = ("hour", "day", "model")


class UsageController(Controller):
    path = "/api/v1/me/usage"
    tags = ["usage"]
    security = [{"gatewayToken": []}]

    @get(
        summary="The caller's token usage, requests and 429 rejections, by hour, day or model",
        description=(
            "Counted from the usage the upstream reported in each /v1/messages answer "
            "(streamed or not); other paths count as requests without tokens; rejections "
            "are 429s over a concurrency cap (model ''). Hours are UTC; `from` and `to` "
            "are taken to the hour below. Workers write their totals every few seconds "
            "(GATEWAY_USAGE_FLUSH_INTERVAL), so the last seconds may not show yet."
        ),
    )
    async def usage(
        self,
        request: Request[Any, Any, State],
        from_: Annotated[
            str | None,
            Parameter(
                query="from",
                description="ISO-8601 date or date-time, inclusive (default: 6 days before "
                "today's UTC midnight)",
            ),
        ] = None,
        to: Annotated[
            str | None,
            Parameter(
                description="ISO-8601 date or date-time, exclusive; within an hour: to its "
                "end (default: now)"
            ),
        ] = None,
        group_by: Annotated[
            str | None,
            Parameter(description="hour, day (the default) or model"),
        ] = None,
    ) -> UsageReport:
        user_id = await authenticated_user(request)
        try:
            since, until = default_range(datetime.now(UTC))
            if from_ is not None:
                since = parse_instant(from_, "from")
            if to is not None:
                until = parse_instant(to, "to", up=True)
            check_range(since, until, names=("from", "to"))
            group = parse_group(group_by or "day", allowed=API_GROUPS)
        except RangeError as exc:
            raise InvalidRequest(str(exc)) from None
        try:
            records = await usage_between(since, until, user_id=user_id)
        except StorageError as exc:
            raise _storage_down(exc) from exc
        return summarize(records, group)
