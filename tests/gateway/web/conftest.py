"""A real Chromium (Debian's, never a downloaded build) driven by Playwright, per module."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Playwright, sync_playwright

from tests.fixtures.gateway import GatewayProcess
from tests.gateway.web.browsing import (
    CHROMIUM,
    CHROMIUM_ARGS,
    HOST_NAME,
    BrowserLog,
    SettingsPage,
    open_page,
)


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: scripts/test installs it (apt-get install -y chromium)"
        )
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(
        executable_path=str(CHROMIUM),
        headless=True,
        args=[*CHROMIUM_ARGS, f"--host-resolver-rules=MAP {HOST_NAME} 127.0.0.1"],
    )
    yield browser
    browser.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Screenshots of the states a test reaches: artifacts under pytest's temp folder."""
    folder = tmp_path / "screenshots"
    folder.mkdir()
    return folder


@pytest.fixture
def settings_page(
    browser: Browser, shared_gateway: GatewayProcess, shots: Path
) -> Iterator[Callable[..., SettingsPage]]:
    """Open the page in a fresh browser context (options as Playwright's ``new_context``);
    afterwards, every page opened must have logged no error and thrown nothing."""
    opened: list[tuple[Any, BrowserLog]] = []

    def open_settings(**context_options: Any) -> SettingsPage:
        page, log = open_page(browser, **context_options)
        opened.append((page, log))
        return SettingsPage(page, log, shared_gateway, shots)

    yield open_settings
    problems = [problem for _page, log in opened for problem in log.problems]
    for page, _log in opened:
        page.context.close()
    assert not problems, "the page logged errors:\n" + "\n".join(problems)
