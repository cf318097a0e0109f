"""The settings page's "Last 7 days" panel in Debian's Chromium, against a real gateway.

Usage is written straight into the gateway's database (the rows a worker's flush writes),
so the test controls which days hold what; one real request shows the live path too.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from playwright.sync_api import expect

from storage import repository
from storage.engine import bind_engine, create_engine
from storage.tables import TABLES
from storage.usage import UsageDelta, add_usage
from tests.fixtures.databases import _run_in_thread
from tests.fixtures.gateway import GatewayProcess
from tests.gateway.web.browsing import SettingsPage

pytestmark = pytest.mark.slow

Open = Callable[..., SettingsPage]


def user_with_usage(gateway: GatewayProcess, deltas: list[dict[str, object]]) -> str:
    return _run_in_thread(_user_with_usage(gateway.env["GATEWAY_DATABASE_URL"], deltas))


async def _user_with_usage(database_url: str, deltas: list[dict[str, object]]) -> str:
    previous = [(table, table._meta.db) for table in TABLES]
    bind_engine(create_engine(database_url))
    try:
        user = await repository.create_user(f"usage{uuid.uuid4().hex[:10]}")
        _record, token = await repository.issue_token(user.id, label="usage panel test")
        await add_usage([UsageDelta(user_id=user.id, **delta) for delta in deltas])  # type: ignore[arg-type]
        return token
    finally:
        for table, db in previous:
            table._meta.db = db


def test_the_last_7_days_as_a_chart_and_a_table(
    settings_page: Open, shared_gateway: GatewayProcess
) -> None:
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    two_days_ago = now - timedelta(days=2)
    token = user_with_usage(
        shared_gateway,
        [
            dict(hour=now, model="claude-a", requests=3, input_tokens=1200,
                 output_tokens=300, cache_read_input_tokens=500),
            dict(hour=now, model="", rejected=2),
            dict(hour=two_days_ago, model="claude-b", requests=1, input_tokens=100,
                 output_tokens=50, cache_creation_input_tokens=25),
            # Older than the panel's week: not shown, not counted.
            dict(hour=now - timedelta(days=9), model="claude-a", requests=7, output_tokens=999),
        ],
    )  # fmt: skip
    page = settings_page()
    page.open()
    page.sign_in(token)
    panel = page.page.get_by_role("region", name="Last 7 days")
    expect(panel).to_be_visible()
    summary = panel.locator("#usage-summary")
    expect(summary).to_have_text("4 requests, 2 refused (429), 2,175 tokens (350 output).")
    chart = panel.get_by_role("img", name="Tokens by day")
    expect(chart).to_be_visible()
    days = chart.locator("g.usage-day")
    expect(days).to_have_count(7)
    # Oldest first, today last; bars scaled to the busiest day.
    today, earlier = days.nth(6), days.nth(4)
    assert today.get_attribute("data-day") == now.date().isoformat()
    assert earlier.get_attribute("data-day") == two_days_ago.date().isoformat()
    tallest = float(today.locator("rect.bar-in").get_attribute("height") or 0)
    assert tallest > 0
    assert float(earlier.locator("rect.bar-in").get_attribute("height") or 0) < tallest / 5
    assert float(days.nth(5).locator("rect.bar-in").get_attribute("height") or 0) == 0
    assert "1,700 input, 300 output tokens, 3 requests, 2 refused" in (
        today.locator("title").text_content() or ""
    )
    rows = panel.get_by_role("table").locator("tbody tr")
    expect(rows).to_have_count(7)
    expect(rows.nth(0).locator("td")).to_have_text(["3", "2", "1,200", "0", "500", "300"])
    expect(rows.nth(2).locator("td")).to_have_text(["1", "0", "100", "25", "0", "50"])
    # Drawn by the page's own module: no script or style from anywhere else.
    assert all(request.url.startswith(shared_gateway.url) for request in page.log.requests), [
        r.url for r in page.log.requests
    ]
    page.shot("usage-panel")


def test_a_new_user_sees_no_usage_then_their_first_request(
    settings_page: Open, shared_gateway: GatewayProcess
) -> None:
    token = user_with_usage(shared_gateway, [])
    response = shared_gateway.put_key(token, key=f"sk-ant-test-{uuid.uuid4().hex}")
    assert response.status_code == 204
    page = settings_page()
    page.open()
    page.sign_in(token)
    summary = page.page.locator("#usage-summary")
    expect(summary).to_have_text("No requests in the last 7 days.")
    expect(page.page.get_by_role("img", name="Tokens by day")).to_be_hidden()
    answer = httpx.post(
        f"{shared_gateway.url}/v1/messages",
        params={"input_tokens": "40", "events": "3"},
        json={"model": "claude-test", "max_tokens": 8, "messages": []},
        headers={"x-api-key": token},
        timeout=10,
    )
    assert answer.status_code == 200
    # The worker writes within GATEWAY_USAGE_FLUSH_INTERVAL (2 s); the page reads on its poll.
    for _ in range(40):
        page.poll()
        if (summary.text_content() or "").startswith("1 request,"):
            break
        page.page.wait_for_timeout(250)
    expect(summary).to_have_text("1 request, 0 refused (429), 43 tokens (3 output).")
