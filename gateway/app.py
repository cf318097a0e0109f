"""The Litestar application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, Literal

import msgspec
from litestar import HttpMethod, Litestar, Request, Response, get, head, route
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme, Tag

from gateway.access_log import ACCESS
from gateway.errors import GatewayError, NotFound, error_body
from gateway.logs import configure_logging
from gateway.me_api import UNAUTHORIZED, AnthropicKeyController, error_response
from gateway.paths import has_traversal
from gateway.proxy import Proxy
from gateway.proxy import Receive as ProxyReceive
from gateway.proxy import Scope as ProxyScope
from gateway.proxy import Send as ProxySend
from gateway.resources import WorkerResources
from gateway.settings import MAX_REQUEST_BODY, Settings
from gateway.usage.api import UsageController
from gateway.web import settings_page_router
from ipc.errors import GatesUnavailable
from storage.engine import ping
from storage.errors import StorageError

log = logging.getLogger("gateway.app")

_KIND_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


def _gateway_error(_: Request[Any, Any, Any], exc: GatewayError) -> Response[bytes]:
    return Response(
        exc.body(), status_code=exc.status, media_type="application/json", headers=exc.headers
    )


def _http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    kind = _KIND_BY_STATUS.get(exc.status_code, "api_error")
    message = exc.detail if exc.status_code < 500 else "Internal server error."
    return Response(
        error_body(kind, message),
        status_code=exc.status_code,
        media_type="application/json",
        # A 405's Allow, among others: the router sets it, the answer must keep it.
        headers=exc.headers if exc.status_code < 500 else None,
    )


def _unexpected_error(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    # Logged with its trace here; the client gets no trace, key or token.
    log.exception("unhandled error", exc_info=exc)
    return Response(
        error_body("api_error", "Internal server error."),
        status_code=500,
        media_type="application/json",
    )


class HealthStatus(msgspec.Struct):
    status: Literal["ok"]


HEALTH_DOWN = error_response("The database (or, with Redis gates, Redis) does not answer")


async def _health_problem(request: Request[Any, Any, Any]) -> str | None:
    try:
        await ping()
    except StorageError:
        return "database unreachable"
    shared = request.app.state.resources.shared
    if shared is not None:
        # A host cut off from Redis refuses every request: a load balancer should know.
        try:
            await shared.ping()
        except GatesUnavailable:
            return "coordination store unreachable"
    return None


@get(
    "/healthz",
    summary="200 when the database (and with Redis gates, Redis) answers, 503 when not",
    tags=["health"],
    responses={503: HEALTH_DOWN},
)
async def healthz(request: Request[Any, Any, Any]) -> Response[HealthStatus]:
    problem = await _health_problem(request)
    if problem is not None:
        return Response(
            error_body("api_error", problem),  # type: ignore[arg-type]
            status_code=503,
            media_type="application/json",
        )
    return Response(HealthStatus(status="ok"), media_type="application/json")


@head("/healthz", summary="As GET /healthz, without a body", tags=["health"])
async def healthz_head(request: Request[Any, Any, Any]) -> Response[None]:
    problem = await _health_problem(request)
    return Response(None, status_code=503 if problem else 200, headers={"content-length": "0"})


_PROXY_DESCRIPTION = (
    "Every /v1/* request is relayed to the Anthropic API as it is (method, path, query, "
    "body and the allow-listed headers), with the user's own Anthropic key in place of "
    "the gateway token, and the answer streamed back byte for byte (SSE included). The "
    "gateway answers itself, in Anthropic's error envelope, only: 401 (token), 413 (a "
    "body over 32 MiB), 429 overloaded_error (over the user's or the global concurrency "
    "cap, with retry-after), 502/504 (upstream unreachable or stalled) and 503."
)


@route(
    "/v1/{path:path}",
    http_method=[
        HttpMethod.GET,
        HttpMethod.POST,
        HttpMethod.PUT,
        HttpMethod.PATCH,
        HttpMethod.DELETE,
    ],
    summary="Anthropic API pass-through (the Messages API and the rest of /v1)",
    description=_PROXY_DESCRIPTION,
    tags=["proxy"],
    security=[{"gatewayToken": []}, {"apiKey": []}],
    responses={
        401: UNAUTHORIZED,
        429: error_response("Over a concurrency cap; retry after retry-after"),
    },
    status_code=200,
)
async def proxy_documentation(path: str) -> None:
    # Documentation only: GatewayApp hands every /v1/ path to the proxy before routing.
    raise NotFound(f"/v1/{path}: not routed here")


def create_app(settings: Settings) -> GatewayApp:
    resources = WorkerResources(settings)
    proxy = Proxy(
        resources,
        max_body=MAX_REQUEST_BODY,
        retry_after=settings.retry_after_seconds,
        read_timeout=settings.upstream_read_timeout,
        body_timeout=settings.request_body_timeout,
        queue_timeout=settings.queue_timeout,
    )

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # Again here: Granian sets up its workers' logging after loading the app.
        configure_logging(settings.log_level)
        await resources.open()
        app.state.resources = resources
        ACCESS.open()
        try:
            yield
        finally:
            try:
                await resources.close()
            finally:
                ACCESS.close()

    app = Litestar(
        route_handlers=[
            AnthropicKeyController,
            UsageController,
            healthz,
            healthz_head,
            proxy_documentation,
            settings_page_router(),
        ],
        lifespan=[lifespan],
        exception_handlers={
            GatewayError: _gateway_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
        openapi_config=OpenAPIConfig(
            title="LLM gateway",
            version="0.1.0",
            description=(
                "An Anthropic-compatible gateway. The settings API manages the caller's own "
                "Anthropic key and concurrency cap; /v1/* is the pass-through. Send the "
                "gateway token as `x-api-key` or `Authorization: Bearer`."
            ),
            path="/schema",
            # The JSON document only (at /schema and /schema/openapi.json): Litestar's
            # Redoc and Swagger pages load their scripts and fonts from CDNs, blank on a
            # host without internet.
            render_plugins=[JsonRenderPlugin()],
            tags=[
                Tag(name="settings", description="The caller's Anthropic key and cap"),
                Tag(name="proxy", description=_PROXY_DESCRIPTION),
                Tag(name="health", description="For load balancers and monitors"),
            ],
            components=Components(
                security_schemes={
                    "gatewayToken": SecurityScheme(
                        type="http", scheme="bearer", description="The gateway token"
                    ),
                    "apiKey": SecurityScheme(
                        type="apiKey",
                        name="x-api-key",
                        security_scheme_in="header",
                        description="The gateway token, as Anthropic's SDKs send a key",
                    ),
                }
            ),
        ),
        debug=False,
    )
    return GatewayApp(app, proxy)


class GatewayApp:
    """The ASGI entry: ``/v1/*`` goes straight to the proxy, the rest to Litestar.

    Straight, because the proxy is the hot path and needs no routing, and because it
    must see the raw path: a router normalises ``/v1/../x`` before anyone can refuse it.
    """

    def __init__(self, litestar: Litestar, proxy: Proxy) -> None:
        self.litestar = litestar
        self.proxy = proxy

    def __call__(
        self, scope: ProxyScope, receive: ProxyReceive, send: ProxySend
    ) -> Awaitable[None]:
        # A plain function handing over the chosen coroutine: no frame of its own held
        # for the life of every stream.
        if scope["type"] == "http":
            raw_path = scope.get("raw_path") or scope["path"].encode()
            if raw_path.startswith(b"/v1/") or has_traversal(raw_path):
                return self.proxy(scope, receive, send)
        return self.litestar(scope, receive, send)  # type: ignore[arg-type]


def app_from_environment() -> GatewayApp:
    """Granian's factory target: every worker builds its app from the same environment."""
    return create_app(Settings.from_env())
