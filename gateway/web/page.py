"""Serves the settings page and its assets from the package, under a strict policy."""

from __future__ import annotations

import hashlib
from importlib.resources import files
from typing import Any, Final

import msgspec
from litestar import Request, Response, Router, get
from litestar.exceptions import NotFoundException

PAGE_PATH: Final = "/me/proxy"
ASSETS_PATH: Final = f"{PAGE_PATH}/assets"

# No inline script or style anywhere: the page, its stylesheet and its module come from
# this origin, and the page talks only to this origin's API.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
SECURITY_HEADERS: Final = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}

# Litestar adds "; charset=utf-8" to every text/* type.
_MEDIA_TYPES: Final = {
    ".html": "text/html",
    ".css": "text/css",
    ".js": "text/javascript",
    ".svg": "image/svg+xml",
}


class StaticFile(msgspec.Struct, frozen=True):
    body: bytes
    media_type: str
    etag: str


def load_static_files() -> dict[str, StaticFile]:
    """Every file of ``static/``, read once per worker (they are a few kilobytes)."""
    loaded = {}
    for entry in files(__package__).joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        media_type = _MEDIA_TYPES.get(suffix)
        if media_type is None or not entry.is_file():
            continue
        body = entry.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        loaded[entry.name] = StaticFile(body=body, media_type=media_type, etag=etag)
    return loaded


def settings_page_router() -> Router:
    """``GET /me/proxy`` (never stored by a cache: it is the signed-in view's shell) and
    ``GET /me/proxy/assets/{name}`` (revalidated by ETag, so an upgrade shows at once)."""
    static = load_static_files()
    page = static.pop("index.html")

    @get(PAGE_PATH, include_in_schema=False)
    async def settings_page() -> Response[bytes]:
        return Response(
            page.body,
            media_type=page.media_type,
            headers={**SECURITY_HEADERS, "cache-control": "no-store"},
        )

    @get(f"{ASSETS_PATH}/{{name:str}}", include_in_schema=False)
    async def settings_asset(name: str, request: Request[Any, Any, Any]) -> Response[bytes]:
        asset = static.get(name)
        if asset is None:
            raise NotFoundException(f"no asset named {name!r}")
        headers = {**SECURITY_HEADERS, "cache-control": "no-cache", "etag": asset.etag}
        if asset.etag in _etags(request.headers.get("if-none-match", "")):
            return Response(b"", status_code=304, headers=headers)
        return Response(asset.body, media_type=asset.media_type, headers=headers)

    return Router(path="/", route_handlers=[settings_page, settings_asset])


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",")}
