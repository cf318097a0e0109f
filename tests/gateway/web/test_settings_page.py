"""The settings page in a real browser, against a real two-worker `gateway serve`.

Debian's Chromium, driven by Playwright, talks to the gateway of tests/gateway/conftest.py
(SQLite, the fake upstream behind it). Every test works on users of its own; every page
must log no console error (checked after each test by the ``settings_page`` fixture).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from playwright.sync_api import Route, expect

from tests.fixtures.gateway import GatewayProcess, held_streams
from tests.gateway.web.browsing import (
    HOST_NAME,
    KEY_API,
    TIMEZONE,
    SettingsPage,
    api_status,
    new_user,
    upstream_key_used,
    wait_until,
)

pytestmark = pytest.mark.slow

Open = Callable[..., SettingsPage]

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
WRONG_TOKEN = "Invalid, unknown, expired or revoked gateway token."


def new_key(tag: str = "k") -> str:
    return f"sk-ant-test-{tag}-{uuid.uuid4().hex}"


def user_with_key(gateway: GatewayProcess, *, cap: int | None = None) -> tuple[str, str]:
    token, key = new_user(gateway), new_key("stored")
    response = gateway.put_key(token, key=key, cap=cap)
    assert response.status_code == 204, response.text
    return token, key


def body_of(request: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(request.post_data)
    return body


def local_time(configured_at: str, zone: str = TIMEZONE) -> str:
    """How de-DE shows a time with dateStyle "medium", timeStyle "short"."""
    at = datetime.fromisoformat(configured_at.replace("Z", "+00:00")).astimezone(ZoneInfo(zone))
    return at.strftime("%d.%m.%Y, %H:%M")


# -- signing in and saving --------------------------------------------------------------


def test_sign_in_store_a_key_and_cap_and_see_the_status_line(
    settings_page: Open, shared_gateway: GatewayProcess
) -> None:
    token = new_user(shared_gateway)
    page = settings_page(locale="de-DE")
    response = page.open()
    assert response.headers["content-security-policy"] == CSP
    expect(page.token_input).to_be_focused()
    expect(page.token_input).to_have_attribute("type", "password")
    page.shot("signed-out")

    page.sign_in(token)
    expect(page.status).to_have_text("No key stored yet")
    expect(page.key).to_have_value("")
    expect(page.key).to_have_attribute("type", "password")
    expect(page.key).to_have_attribute("placeholder", "sk-ant-…")
    expect(page.cap).to_have_value("8")  # the default for a new key
    expect(page.save).to_be_disabled()
    expect(page.remove).to_be_hidden()
    expect(page.key).to_be_focused()
    # The token: in this tab's sessionStorage, sent as a bearer header, nowhere else.
    assert page.stored_token() == token
    assert page.page.context.cookies() == []
    assert token not in page.page.url
    first_read = page.log.api_calls(method="GET")[0]
    assert first_read.headers["authorization"] == f"Bearer {token}"
    assert "cookie" not in first_read.headers
    assert all(token not in request.url for request in page.log.requests)

    key = new_key("first")
    page.key.fill(key)
    page.cap.fill("5")
    mark = page.log.mark()
    page.save.click()
    expect(page.message).to_have_text("Saved: key stored, cap 5.")
    puts = page.log.api_calls(mark, "PUT")
    assert len(puts) == 1
    assert body_of(puts[0]) == {"key": key, "max_concurrent": 5}
    assert puts[0].headers["content-type"] == "application/json"

    stored = api_status(shared_gateway, token)
    assert stored["max_concurrent"] == 5
    expected = f"Configured · last set {local_time(stored['configured_at'])} · cap 5 · 0 in use now"
    expect(page.status).to_have_text(expected)
    expect(page.key).to_have_value("")  # never echoed back
    expect(page.key).to_have_attribute("placeholder", "Leave empty to keep the stored key")
    expect(page.save).to_be_disabled()
    expect(page.remove).to_be_visible()
    assert key not in page.page.content()
    assert upstream_key_used(shared_gateway, token) == key
    page.shot("configured")


def test_change_only_the_cap(settings_page: Open, shared_gateway: GatewayProcess) -> None:
    token, key = user_with_key(shared_gateway, cap=3)
    page = settings_page()
    page.open()
    page.sign_in(token)
    expect(page.status).to_contain_text("· cap 3 · 0 in use now")
    expect(page.cap).to_have_value("3")
    page.cap.fill("7")
    mark = page.log.mark()
    page.save.click()
    expect(page.message).to_have_text("Saved: cap 7.")
    expect(page.status).to_contain_text("· cap 7 · ")
    puts = page.log.api_calls(mark, "PUT")
    assert [body_of(put) for put in puts] == [{"max_concurrent": 7}]
    assert api_status(shared_gateway, token)["max_concurrent"] == 7
    assert upstream_key_used(shared_gateway, token) == key  # the key is untouched


def test_rotate_only_the_key_keeps_the_cap(
    settings_page: Open, shared_gateway: GatewayProcess
) -> None:
    token, first = user_with_key(shared_gateway, cap=6)
    page = settings_page()
    page.open()
    page.sign_in(token)
    expect(page.key).to_have_attribute("placeholder", "Leave empty to keep the stored key")
    second = new_key("second")
    page.key.fill(f"  {second}  ")  # pasted with blanks around it, trimmed as the API does
    mark = page.log.mark()
    page.save.click()
    expect(page.message).to_have_text("Saved: key replaced.")
    puts = page.log.api_calls(mark, "PUT")
    assert [body_of(put) for put in puts] == [{"key": second}]
    expect(page.status).to_contain_text("· cap 6 · ")
    assert api_status(shared_gateway, token)["max_concurrent"] == 6
    wait_until(lambda: upstream_key_used(shared_gateway, token) == second, "the new key")
    assert first != second


def test_save_is_enabled_only_when_something_changed(
    settings_page: Open, shared_gateway: GatewayProcess
) -> None:
    token, _key = user_with_key(shared_gateway, cap=8)
    page = settings_page()
    page.open()
    page.sign_in(token)
    expect(page.save).to_be_disabled()
    page.key.fill("sk-ant-x")
    expect(page.save).to_be_enabled()
    page.key.fill("   ")
    expect(page.save).to_be_disabled()
    page.cap.fill("9")
    expect(page.save).to_be_enabled()
    page.cap.fill("8")
    expect(page.save).to_be_disabled()
    assert page.log.api_calls(method="PUT") == []


# -- validation in the page: inline, focused, and nothing sent ---------------------------


@pytest.mark.parametrize(
    ("cap", "message"),
    [
        ("0", "Must be between 1 and 256, got 0."),
        ("257", "Must be between 1 and 256, got 257."),
        ("2.5", "Must be a whole number from 1 to 256, got 2.5."),
        ("", "Enter the number of concurrent requests, from 1 to 256."),
    ],
    ids=["zero", "257", "fraction", "empty"],
)
def test_a_bad_cap_is_shown_inline_and_sends_nothing(
    settings_page: Open, shared_gateway: GatewayProcess, cap: str, message: str
) -> None:
    token, _key = user_with_key(shared_gateway, cap=4)
    page = settings_page()
    page.open()
    page.sign_in(token)
    page.cap.fill(cap)
    expect(page.save).to_be_enabled()
    mark = page.log.mark()
    page.save.click()
    error = page.error_of("cap")
    expect(error).to_have_text(message)
    expect(error).to_be_visible()
    expect(page.cap).to_be_focused()
    expect(page.cap).to_have_attribute("aria-invalid", "true")
    assert "cap-error" in (page.cap.get_attribute("aria-describedby") or "")
    # Enter in the field submits too; still nothing leaves the page.
    page.cap.press("Enter")
    expect(error).to_have_text(message)
    page.page.wait_for_timeout(300)  # room for a request that should not come
    assert page.log.since(mark) == []
    assert api_status(shared_gateway, token)["max_concurrent"] == 4
    if cap == "0":
        page.shot("cap-error")

    # Fixing it clears the error and saves.
    page.cap.fill("12")
    page.save.click()
    expect(page.message).to_have_text("Saved: cap 12.")
    expect(error).to_be_hidden()
    expect(page.cap).not_to_have_attribute("aria-invalid", "true")
    assert api_status(shared_gateway, token)["max_concurrent"] == 12


def test_a_bad_key_is_shown_inline_and_sends_nothing(
    settings_page: Open, shared_gateway: GatewayProcess
) -> None:
    token = new_user(shared_gateway)
    page = settings_page()
    page.open()
    page.sign_in(token)
    mark = page.log.mark()
    cases = [
        ("sk-test-wrong-prefix", "Must start with sk-ant-"),
        ("sk-ant-" + "x" * 250, "Must be at most 256 characters (this one has 257)."),
    ]
    for key, message in cases:
        page.key.fill(key)
        page.save.click()
        expect(page.error_of("key")).to_have_text(message)
        expect(page.key).to_be_focused()
    # Both fields wrong: both shown, focus on the first.
    page.key.fill("nope")
    page.cap.fill("300")
    page.save.click()
    expect(page.error_of("key")).to_have_text("Must start with sk-ant-")
    expect(page.error_of("cap")).to_have_text("Must be between 1 and 256, got 300.")
    expect(page.key).to_be_focused()
    # A cap alone, with no key stored yet, is refused as the API would.
    page.key.fill("")
    page.cap.fill("5")
    page.save.click()
    expect(page.error_of("key")).to_have_text("Enter your key too: none is stored yet.")
    expect(page.error_of("cap")).to_be_hidden()
    page.page.wait_for_timeout(300)
    assert page.log.since(mark) == []
    assert api_status(shared_gateway, token)["configured"] is False

    # 256 characters is the limit, not past it.
    longest = "sk-ant-" + "y" * 249
    page.key.fill(longest)
    page.cap.fill("8")
    page.save.click()
    expect(page.message).to_have_text("Saved: key stored.")
    assert upstream_key_used(shared_gateway, token) == longest


def test_a_server_400_is_shown_next_to_its_field(
    settings_page: Open, shared_gateway: GatewayProcess
) -> None:
    token, _key = user_with_key(shared_gateway, cap=8)
    page = settings_page()
    page.log.allow_status(409)  # a cap alone while no key is stored: a conflict
    page.open()
    page.sign_in(token)
    expect(page.status).to_contain_text("Configured")
    # Removed elsewhere (another tab, curl) while this page still shows it stored.
    removed = httpx.delete(
        f"{shared_gateway.url}{KEY_API}", headers={"x-api-key": token}, timeout=10
    )
    assert removed.status_code == 204
    page.cap.fill("5")
    mark = page.log.mark()
    page.save.click()
    error = page.error_of("cap")
    expect(error).to_have_text("No Anthropic key configured yet; send key as well")
    expect(page.cap).to_be_focused()
    expect(page.cap).to_have_attribute("aria-invalid", "true")
    assert [body_of(put) for put in page.log.api_calls(mark, "PUT")] == [{"max_concurrent": 5}]
    expect(page.status).to_have_text("No key stored yet")  # and the page caught up
    page.shot("server-400")


def test_an_unreachable_gateway_loses_nothing(
    settings_page: Open, shared_gateway: GatewayProcess
) -> None:
    token, key = user_with_key(shared_gateway, cap=4)
    page = settings_page()
    page.log.network_failures_allowed = True
    page.open()
    page.sign_in(token)
    page.page.context.set_offline(True)
    second = new_key("offline")
    page.key.fill(second)
    page.cap.fill("6")
    page.save.click()
    expect(page.message).to_have_text(
        "The gateway did not answer. Check the connection and try again."
    )
    expect(page.message).to_be_focused()
    expect(page.page.locator("#status-problem")).to_contain_text("Not up to date")
    expect(page.key).to_have_value(second)  # what was typed is still there
    expect(page.cap).to_have_value("6")
    expect(page.save).to_be_enabled()
    page.page.context.set_offline(False)
    page.save.click()
    expect(page.message).to_have_text("Saved: key replaced, cap 6.")
    expect(page.page.locator("#status-problem")).to_be_hidden()
    assert api_status(shared_gateway, token)["max_concurrent"] == 6
    assert upstream_key_used(shared_gateway, token) == second != key


# -- tokens -----------------------------------------------------------------------------


def test_a_wrong_token_is_refused_inline(
    settings_page: Open, shared_gateway: GatewayProcess
) -> None:
    page = settings_page()
    page.log.allow_status(401)
    page.open()
    mark = page.log.mark()
    page.page.get_by_role("button", name="Sign in").click()
    expect(page.error_of("token")).to_have_text("Paste your gateway token.")
    assert page.log.since(mark) == []  # an empty field asks no one

    page.token_input.fill(f"gwt_{uuid.uuid4().hex}")
    page.token_input.press("Enter")
    expect(page.error_of("token")).to_have_text(WRONG_TOKEN)
    expect(page.token_input).to_be_focused()
    expect(page.token_input).to_have_attribute("aria-invalid", "true")
    expect(page.page.locator("#signed-in")).to_be_hidden()
    assert page.stored_token() is None
    page.shot("wrong-token")


def test_a_revoked_token_signs_the_page_out(
    settings_page: Open, shared_gateway: GatewayProcess
) -> None:
    name = f"web{uuid.uuid4().hex[:10]}"
    token = shared_gateway.create_user(name)
    page = settings_page()
    page.log.allow_status(401)
    page.open()
    page.sign_in(token)
    listed = shared_gateway.cli("tokens", "list", name, "--json").stdout.splitlines()
    token_id = str(json.loads(listed[0])["id"])
    shared_gateway.cli("tokens", "revoke", token_id)
    page.page.get_by_role("button", name="Refresh").click()
    expect(page.error_of("token")).to_have_text(WRONG_TOKEN)
    expect(page.page.locator("#signed-in")).to_be_hidden()
    expect(page.token_input).to_be_focused()
    assert page.stored_token() is None


def test_sign_out_forgets_the_token(settings_page: Open, shared_gateway: GatewayProcess) -> None:
    token, _key = user_with_key(shared_gateway)
    page = settings_page()
    page.open()
    page.sign_in(token)
    page.page.reload()  # the tab keeps it
    expect(page.status).to_contain_text("Configured")
    page.page.get_by_role("button", name="Sign out").click()
    expect(page.token_input).to_be_visible()
    expect(page.token_input).to_be_focused()
    expect(page.page.locator("#signed-in")).to_be_hidden()
    assert page.stored_token() is None
    assert token not in page.page.content()
    page.page.reload()
    expect(page.token_input).to_be_visible()
    mark = page.log.mark()
    page.poll()
    assert page.log.api_calls(mark) == []  # signed out: no more polling


# -- removing the key -------------------------------------------------------------------


def test_remove_the_key_after_a_confirmation(
    settings_page: Open, shared_gateway: GatewayProcess
) -> None:
    token, _key = user_with_key(shared_gateway, cap=5)
    page = settings_page()
    page.open()
    page.sign_in(token)
    dialog = page.page.get_by_role("dialog", name="Remove the stored key?")

    page.remove.click()
    expect(dialog).to_be_visible()
    expect(page.page.get_by_role("button", name="Cancel")).to_be_focused()
    page.shot("remove-confirm")
    page.page.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    expect(page.remove).to_be_focused()
    page.remove.click()
    page.page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    assert page.log.api_calls(method="DELETE") == []
    assert api_status(shared_gateway, token)["configured"] is True

    page.remove.click()
    dialog.get_by_role("button", name="Remove key").click()
    expect(page.status).to_have_text("No key stored yet")
    expect(page.message).to_have_text("Key removed.")
    expect(page.remove).to_be_hidden()
    expect(page.cap).to_have_value("8")
    assert len(page.log.api_calls(method="DELETE")) == 1
    assert api_status(shared_gateway, token)["configured"] is False
    refused = httpx.get(f"{shared_gateway.url}/v1/models", headers={"x-api-key": token})
    assert refused.status_code == 401


# -- requests in flight -----------------------------------------------------------------


def test_in_use_now_counts_open_streams(
    settings_page: Open, shared_gateway: GatewayProcess
) -> None:
    token, _key = user_with_key(shared_gateway, cap=4)
    page = settings_page()
    page.open()
    page.sign_in(token)
    expect(page.status).to_contain_text("· cap 4 · 0 in use now")
    with held_streams(shared_gateway, token, 2):
        page.page.get_by_role("button", name="Refresh").click()
        expect(page.status).to_contain_text("· cap 4 · 2 in use now")
        page.shot("in-use")
    # The streams are gone; the page's own polling brings the count back down.
    polls = 0

    def back_to_zero() -> bool:
        nonlocal polls
        polls += 1
        page.poll()
        return "· 0 in use now" in (page.status.text_content() or "")

    wait_until(back_to_zero, "the status line to show 0 in use")
    assert polls >= 1
    assert page.log.api_calls(method="PUT") == []


# -- the "Use it" block -----------------------------------------------------------------


def test_use_it_shows_the_lines_masks_the_token_and_copies(
    settings_page: Open, shared_gateway: GatewayProcess
) -> None:
    token = new_user(shared_gateway)
    page = settings_page(permissions=["clipboard-read", "clipboard-write"])
    page.open()
    page.sign_in(token)
    origin = shared_gateway.url
    masked = f"{token[:4]}{'•' * 12}"
    snippets = page.page.locator("#snippets li code")
    expected_masked = [
        f"export ANTHROPIC_BASE_URL={origin}",
        f"export ANTHROPIC_API_KEY={masked}",
        f"ANTHROPIC_BASE_URL={origin} ANTHROPIC_API_KEY={masked} claude",
        f'client = anthropic.Anthropic(base_url="{origin}", api_key="{masked}")',
    ]
    expect(snippets).to_have_text(expected_masked)
    assert token not in (page.page.locator("body").text_content() or "")

    real = [line.replace(masked, token) for line in expected_masked]
    names = ["Base URL", "Gateway token", "Claude Code", "Python SDK"]
    for name, line in zip(names, real, strict=True):
        page.page.get_by_role("button", name=f"Copy: {name}").click()
        expect(page.page.locator("#copy-message")).to_have_text(f"Copied: {name}.")
        assert page.page.evaluate("navigator.clipboard.readText()") == line

    reveal = page.page.get_by_role("button", name="Show token")
    reveal.click()
    expect(snippets).to_have_text(real)
    page.page.get_by_role("button", name="Hide token").click()
    expect(snippets).to_have_text(expected_masked)


def test_works_on_a_plain_http_host_name(
    settings_page: Open, shared_gateway: GatewayProcess
) -> None:
    """A team's gateway at http://gateway.test:PORT is no secure context: no clipboard API,
    and the page must still work and copy (the browser maps the name to loopback)."""
    token, _key = user_with_key(shared_gateway, cap=2)
    page = settings_page(permissions=["clipboard-read", "clipboard-write"])
    origin = shared_gateway.url.replace("127.0.0.1", HOST_NAME)
    page.page.goto(f"{origin}/me/proxy")
    assert page.page.evaluate("window.isSecureContext") is False
    page.sign_in(token)
    expect(page.status).to_contain_text("· cap 2 · 0 in use now")
    page.page.get_by_role("button", name="Copy: Base URL").click()
    expect(page.page.locator("#copy-message")).to_have_text("Copied: Base URL.")
    # Read back where the clipboard API exists: another tab of the same browser.
    reader = page.page.context.new_page()
    reader.goto(f"{shared_gateway.url}/me/proxy/assets/icon.svg")
    assert reader.evaluate("navigator.clipboard.readText()") == (
        f"export ANTHROPIC_BASE_URL={origin}"
    )


# -- keyboard, narrow screens, and what the page trusts -----------------------------------


def test_keyboard_only(settings_page: Open, shared_gateway: GatewayProcess) -> None:
    token = new_user(shared_gateway)
    page = settings_page()
    keyboard = page.page.keyboard
    page.open()
    expect(page.token_input).to_be_focused()
    keyboard.type(token)
    keyboard.press("Enter")
    expect(page.status).to_have_text("No key stored yet")
    expect(page.key).to_be_focused()
    key = new_key("typed")
    keyboard.type(key)
    keyboard.press("Tab")
    expect(page.cap).to_be_focused()
    keyboard.press("ArrowUp")  # 8 -> 9 with the arrow, as number fields do
    keyboard.press("Enter")
    expect(page.message).to_have_text("Saved: key stored, cap 9.")
    expect(page.message).to_be_focused()  # announced, and where Tab continues from
    assert api_status(shared_gateway, token)["max_concurrent"] == 9

    # An error takes focus to its field; fix it from the keyboard.
    page.cap.focus()
    keyboard.press("Control+A")
    keyboard.type("0")
    keyboard.press("Enter")
    expect(page.cap).to_be_focused()
    expect(page.error_of("cap")).to_be_visible()
    keyboard.press("Control+A")
    keyboard.type("3")
    keyboard.press("Enter")
    expect(page.message).to_have_text("Saved: cap 3.")
    # The walk below starts once the save is over: the page refreshes after the message
    # and re-enables its buttons; Shift+Tabs pressed meanwhile ended on no element with an
    # id, once, in CI.
    expect(page.status).to_contain_text("· cap 3 ·")
    expect(page.message).to_be_focused()

    # Tab reaches Remove; the dialog opens on Cancel, Escape closes it, Enter confirms.
    for _ in range(10):
        if page.focused_id() == "remove":
            break
        keyboard.press("Shift+Tab")
    assert page.focused_id() == "remove"
    keyboard.press("Enter")
    expect(page.page.get_by_role("button", name="Cancel")).to_be_focused()
    keyboard.press("Escape")
    expect(page.remove).to_be_focused()
    keyboard.press("Enter")
    keyboard.press("Shift+Tab")
    assert page.focused_id() == "remove-confirm"
    keyboard.press("Enter")
    expect(page.status).to_have_text("No key stored yet")

    # Every control is reachable with Tab alone, Sign out included.
    reached = set()
    for _ in range(30):
        keyboard.press("Tab")
        reached.add(page.focused_id())
    assert {"sign-out", "refresh", "key", "cap", "reveal"} <= reached


def test_usable_at_360_px(settings_page: Open, shared_gateway: GatewayProcess) -> None:
    token = new_user(shared_gateway)
    page = settings_page(viewport={"width": 360, "height": 740})
    page.open()
    page.sign_in(token)
    page.key.fill(new_key("narrow"))
    page.cap.fill("300")
    page.save.click()
    expect(page.error_of("cap")).to_be_visible()
    overflow = page.page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow == 0
    controls = page.page.locator("input:visible, button:visible, #snippets code")
    assert controls.count() >= 10
    for index in range(controls.count()):
        box = controls.nth(index).bounding_box()
        assert box is not None
        assert box["x"] >= 0 and box["x"] + box["width"] <= 360, controls.nth(index)
    page.shot("narrow-360")
    page.cap.fill("2")
    page.save.click()
    expect(page.status).to_contain_text("· cap 2 · 0 in use now")


def test_what_the_api_returns_is_shown_as_text(
    settings_page: Open, shared_gateway: GatewayProcess
) -> None:
    """A stored value cannot script the page. The real API returns no markup to try this
    with, so its answers are replaced, in the browser, by hostile ones."""
    hostile = '<img src=x onerror="window.pwned=1"><b>bold</b>'

    def answer(route: Route) -> None:
        if route.request.method == "GET":
            body = {
                "configured": True,
                "configured_at": hostile,
                "max_concurrent": 3,
                "in_use": 1,
            }
            route.fulfill(status=200, content_type="application/json", body=json.dumps(body))
        else:
            error = {"type": "error", "error": {"type": "x", "message": f"key: {hostile}"}}
            route.fulfill(status=400, content_type="application/json", body=json.dumps(error))

    def no_usage(route: Route) -> None:  # the usage panel's call, for the same made-up token
        totals = dict.fromkeys(("requests", "rejected", "input_tokens", "output_tokens"), 0)
        totals |= {"cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        body = {"rows": [{"day": hostile, **totals}], "totals": totals}
        route.fulfill(status=200, content_type="application/json", body=json.dumps(body))

    page = settings_page()
    page.log.allow_status(400)
    page.page.route(f"**{KEY_API}", answer)
    page.page.route("**/api/v1/me/usage?*", no_usage)
    page.open()
    page.sign_in("gwt_anything")
    expect(page.status).to_have_text(f"Configured · last set {hostile} · cap 3 · 1 in use now")
    page.key.fill(new_key())
    page.save.click()
    expect(page.error_of("key")).to_have_text(hostile[0].upper() + hostile[1:])
    assert page.page.locator("img, b").count() == 0
    assert page.page.evaluate("window.pwned") is None


def test_the_policy_stops_inline_script(
    settings_page: Open, shared_gateway: GatewayProcess
) -> None:
    page = settings_page()
    response = page.open()
    assert response.headers["content-security-policy"] == CSP
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"
    # What an injection would try: the browser enforces the policy and refuses it.
    page.page.evaluate(
        """() => {
            const script = document.createElement("script");
            script.textContent = "window.inlineRan = true";
            document.body.append(script);
        }"""
    )
    assert page.page.evaluate("window.inlineRan") is None
    refusals = [p for p in page.log.problems if "Content Security Policy" in p]
    assert refusals, page.log.problems
    page.log.problems.clear()  # the refusal was the point; nothing else may be there
