"""The settings page and its assets over plain HTTP: headers, caching, no inline code, packaging."""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from gateway.web.page import CONTENT_SECURITY_POLICY
from tests.fixtures.gateway import ROOT, GatewayProcess

STATIC = ROOT / "gateway" / "web" / "static"
# The issue's policy, spelled out again: a change to the constant must show up here.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


class _PageParts(HTMLParser):
    """What the page loads, and anything that would need 'unsafe-inline'."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []
        self.inline: list[str] = []
        self.ids: list[str] = []
        self.inputs: list[dict[str, str | None]] = []
        self.label_for: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("id"):
            self.ids.append(str(found["id"]))
        if tag == "script":
            if found.get("src"):
                self.loads.append(str(found["src"]))
            else:
                self.inline.append("<script> without src")
        if tag == "link" and found.get("href"):
            self.loads.append(str(found["href"]))
        if tag == "style":
            self.inline.append("<style>")
        if tag == "input":
            self.inputs.append(found)
        if tag == "label" and found.get("for"):
            self.label_for.append(str(found["for"]))
        for name, _value in attrs:
            if name == "style" or name.startswith("on"):
                self.inline.append(f"{name}= on <{tag}>")
            if name in ("src", "href") and str(_value).startswith(("http:", "https:", "//")):
                self.inline.append(f"external {name} {_value}")


def page_parts() -> _PageParts:
    parts = _PageParts()
    parts.feed((STATIC / "index.html").read_text())
    return parts


def assert_security_headers(response: httpx.Response) -> None:
    assert response.headers["content-security-policy"] == CSP
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"


def test_the_policy_is_the_issues() -> None:
    assert CONTENT_SECURITY_POLICY == CSP


def test_the_page_is_served_with_its_headers(shared_gateway: GatewayProcess) -> None:
    for path in ("/me/proxy", "/me/proxy/"):
        response = httpx.get(f"{shared_gateway.url}{path}", timeout=10)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert response.headers["cache-control"] == "no-store"
        assert_security_headers(response)
        assert response.content == (STATIC / "index.html").read_bytes()
        assert "set-cookie" not in response.headers


@pytest.mark.parametrize(
    ("name", "media_type"),
    [
        ("settings.js", "text/javascript; charset=utf-8"),
        ("settings.css", "text/css; charset=utf-8"),
        ("icon.svg", "image/svg+xml"),
    ],
)
def test_every_asset_is_served_with_its_headers_and_revalidated(
    shared_gateway: GatewayProcess, name: str, media_type: str
) -> None:
    url = f"{shared_gateway.url}/me/proxy/assets/{name}"
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"] == media_type
    assert response.content == (STATIC / name).read_bytes()
    assert_security_headers(response)
    assert response.headers["cache-control"] == "no-cache"
    etag = response.headers["etag"]
    again = httpx.get(url, headers={"if-none-match": etag}, timeout=10)
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag
    assert_security_headers(again)
    other = httpx.get(url, headers={"if-none-match": '"something-else"'}, timeout=10)
    assert other.status_code == 200
    assert other.content == response.content


def test_the_page_loads_exactly_the_served_assets() -> None:
    loads = page_parts().loads
    assert sorted(loads) == [
        "/me/proxy/assets/icon.svg",
        "/me/proxy/assets/settings.css",
        "/me/proxy/assets/settings.js",
    ]


@pytest.mark.parametrize(
    "path",
    [
        "/me/proxy/assets/nothing.js",
        "/me/proxy/assets/index.html",  # the page has one address only
        "/me/proxy/assets/..%2Fpage.py",
        "/me/proxy/assets/%2E%2E%2F__init__.py",
        "/me/proxy/assets/",
    ],
)
def test_nothing_else_is_served_from_the_package(shared_gateway: GatewayProcess, path: str) -> None:
    response = httpx.get(f"{shared_gateway.url}{path}", timeout=10)
    # A '..' is refused before routing (400); any other name is simply not there (404).
    traversal = ".." in path or "%2E%2E" in path.upper()
    assert response.status_code == (400 if traversal else 404), response.text
    assert response.headers["content-type"] == "application/json"
    assert b"import" not in response.content


def test_no_inline_script_or_style_and_no_outside_resource() -> None:
    assert page_parts().inline == []
    css = (STATIC / "settings.css").read_text()
    assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//", css)


def test_every_input_has_a_label() -> None:
    parts = page_parts()
    assert parts.inputs, "the page has inputs"
    for found in parts.inputs:
        assert found.get("id") in parts.label_for, found
        # No name: with the module missing, a plain submission would put nothing in a URL.
        assert "name" not in found, found


def test_the_module_never_writes_html() -> None:
    script = (STATIC / "settings.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    assert "localStorage" not in script
    assert "document.cookie" not in script


def test_an_installed_gateway_ships_the_page(tmp_path: Path) -> None:
    """What setuptools puts in a wheel (build_py, as bdist_wheel runs it) has every file."""
    build, egg = tmp_path / "build", tmp_path / "egg"
    egg.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from setuptools import setup; setup()",
            "egg_info",
            "--egg-base",
            str(egg),
            "build_py",
            "--build-lib",
            str(build),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    shipped = build / "gateway" / "web" / "static"
    for source in STATIC.iterdir():
        assert (shipped / source.name).read_bytes() == source.read_bytes(), source.name
