"""Driving the settings page in Debian's Chromium: the browser's log, and the page's parts."""

from __future__ import annotations

import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import httpx
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Locator,
    Page,
    Request,
    Response,
    expect,
)

from storage import repository
from storage.engine import bind_engine, create_engine
from storage.tables import TABLES
from tests.fixtures.databases import _run_in_thread
from tests.fixtures.gateway import GatewayProcess

CHROMIUM: Final = Path("/usr/bin/chromium")
CHROMIUM_ARGS: Final = [
    "--no-sandbox",  # tests run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
]
# A host name the browser resolves to loopback (see the ``browser`` fixture): a page on
# plain http that is not 127.0.0.1 or localhost is no secure context.
HOST_NAME: Final = "gateway.test"
PAGE_PATH: Final = "/me/proxy"
KEY_API: Final = "/api/v1/me/anthropic-key"
REFRESH_MS: Final = 10_000  # settings.js REFRESH_MS
TIMEZONE: Final = "Asia/Kolkata"  # a half-hour offset: local time cannot pass for UTC

# Chromium itself reports a fetch answered 4xx as "Failed to load resource"; a test that
# provokes one on purpose names the status. Nothing else may reach the console.
_FAILED_LOAD: Final = re.compile(
    r"^Failed to load resource: the server responded with a status of (\d+)"
)
_NETWORK_FAILURE: Final = re.compile(r"^Failed to load resource: net::ERR_")


class BrowserLog:
    """Everything a page says on its console or throws, and every request it makes."""

    def __init__(self, page: Page) -> None:
        self.problems: list[str] = []
        self.requests: list[Request] = []
        self.allowed_statuses: set[int] = set()
        self.network_failures_allowed = False
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(f"uncaught: {error}"))
        page.on("request", self._request)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type not in ("error", "warning"):
            return
        failed = _FAILED_LOAD.match(message.text)
        if failed and int(failed.group(1)) in self.allowed_statuses:
            return
        if self.network_failures_allowed and _NETWORK_FAILURE.match(message.text):
            return
        self.problems.append(f"console {message.type}: {message.text}")

    def _request(self, request: Request) -> None:
        self.requests.append(request)

    def allow_status(self, status: int) -> None:
        self.allowed_statuses.add(status)

    def mark(self) -> int:
        return len(self.requests)

    def since(self, mark: int) -> list[Request]:
        """Requests after ``mark``, but the tab's icon, which Chromium fetches when it likes."""
        return [r for r in self.requests[mark:] if not r.url.endswith("/icon.svg")]

    def api_calls(self, mark: int = 0, method: str | None = None) -> list[Request]:
        return [
            r
            for r in self.requests[mark:]
            if KEY_API in r.url and (method is None or r.method == method)
        ]


def open_page(browser: Browser, **context_options: Any) -> tuple[Page, BrowserLog]:
    options: dict[str, Any] = {
        "viewport": {"width": 1024, "height": 900},
        "locale": "en-GB",
        "timezone_id": TIMEZONE,
        **context_options,
    }
    context = browser.new_context(**options)
    page = context.new_page()
    log = BrowserLog(page)
    # The page polls its status every REFRESH_MS; its timers are held still and a test
    # moves them itself, so "no request was sent" means none at all, not "none but a poll".
    start = datetime.now(UTC)
    page.clock.install(time=start)
    page.clock.pause_at(start + timedelta(seconds=1))
    return page, log


class SettingsPage:
    """The settings page of one gateway, in one browser tab."""

    def __init__(self, page: Page, log: BrowserLog, gateway: GatewayProcess, shots: Path) -> None:
        self.page = page
        self.log = log
        self.gateway = gateway
        self.shots = shots

    # the page's parts, found as a person (or a screen reader) finds them

    @property
    def token_input(self) -> Locator:
        return self.page.get_by_label("Gateway token")

    @property
    def key(self) -> Locator:
        return self.page.get_by_label("Anthropic API key")

    @property
    def cap(self) -> Locator:
        return self.page.get_by_label("Concurrent requests")

    @property
    def save(self) -> Locator:
        return self.page.get_by_role("button", name="Save", exact=True)

    @property
    def remove(self) -> Locator:
        return self.page.get_by_role("button", name="Remove key…")

    @property
    def status(self) -> Locator:
        return self.page.locator("#status")

    @property
    def message(self) -> Locator:
        return self.page.locator("#form-message")

    def error_of(self, field: str) -> Locator:
        return self.page.locator(f"#{field}-error")

    # actions

    def open(self) -> Response:
        response = self.page.goto(f"{self.gateway.url}{PAGE_PATH}")
        assert response is not None and response.status == 200
        return response

    def sign_in(self, token: str) -> None:
        self.token_input.fill(token)
        self.page.get_by_role("button", name="Sign in").click()
        expect(self.page.locator("#signed-in")).to_be_visible()
        expect(self.status).not_to_have_text("Loading…")

    def poll(self) -> None:
        """Let the page's refresh timer fire once."""
        self.page.clock.run_for(REFRESH_MS)

    def shot(self, name: str) -> None:
        self.page.screenshot(path=self.shots / f"{name}.png", full_page=True)

    def focused_id(self) -> str:
        return str(self.page.evaluate("document.activeElement && document.activeElement.id"))

    def stored_token(self) -> str | None:
        value = self.page.evaluate("sessionStorage.getItem('gateway-token')")
        return None if value is None else str(value)


def new_user(gateway: GatewayProcess) -> str:
    """A fresh user without a key; its gateway token.

    Made in-process through the repository, the calls `gateway users create` makes: the
    command line costs a Python start per user on a busy machine (test_cli.py tests it).
    """
    return _run_in_thread(_create_user(gateway.env["GATEWAY_DATABASE_URL"]))


async def _create_user(database_url: str) -> str:
    previous = [(table, table._meta.db) for table in TABLES]
    engine = create_engine(database_url)  # no pool: this thread's loop ends with the call
    bind_engine(engine)
    try:
        user = await repository.create_user(f"web{uuid.uuid4().hex[:10]}")
        _record, token = await repository.issue_token(user.id, label="settings page test")
        return token
    finally:
        for table, db in previous:
            table._meta.db = db


def api_status(gateway: GatewayProcess, token: str) -> dict[str, Any]:
    response = httpx.get(
        f"{gateway.url}{KEY_API}", headers={"authorization": f"Bearer {token}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def upstream_key_used(gateway: GatewayProcess, token: str) -> str:
    """The Anthropic key the gateway sends upstream for ``token`` (the fake echoes it)."""
    response = httpx.get(f"{gateway.url}/v1/files/whoami", headers={"x-api-key": token}, timeout=10)
    assert response.status_code == 200, response.text
    return str(response.json()["headers"]["x-api-key"])


def wait_until(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
