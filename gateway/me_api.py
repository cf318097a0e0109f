"""The settings REST API: a user manages their own Anthropic key and concurrency cap."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final, Literal

import msgspec
from litestar import Controller, HttpMethod, Request, Response, delete, get, put, route
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema
from litestar.status_codes import HTTP_204_NO_CONTENT, HTTP_413_REQUEST_ENTITY_TOO_LARGE

from gateway.audit import audit
from gateway.errors import (
    AuthenticationFailed,
    Conflict,
    InvalidRequest,
    PayloadTooLarge,
    ServerFault,
    StorageUnavailableError,
    UnsupportedMediaType,
)
from gateway.headers import gateway_token, is_sendable_key
from gateway.resources import WorkerResources
from storage import repository
from storage.errors import StorageError, StorageUnavailable
from storage.tokens import hash_token

log = logging.getLogger("gateway.settings_api")

MIN_CAP: Final = 1
MAX_CAP: Final = 256
MAX_KEY_LENGTH: Final = 256
KEY_PREFIX: Final = "sk-ant-"
MAX_SETTINGS_BODY: Final = 64 * 1024
ALLOWED_METHODS: Final = "DELETE, GET, OPTIONS, PUT"
TOO_LARGE_MESSAGE: Final = f"body: must be at most 64 KiB ({MAX_SETTINGS_BODY} bytes)"


class ErrorDetail(msgspec.Struct):
    type: str
    message: Annotated[str, msgspec.Meta(description="Names the field and the rule broken")]


class ErrorResponse(msgspec.Struct):
    """Anthropic's error envelope, as every error of the gateway is shaped."""

    type: Literal["error"]
    error: ErrorDetail


def error_response(description: str) -> ResponseSpec:
    return ResponseSpec(
        data_container=ErrorResponse, description=description, generate_examples=False
    )


UNAUTHORIZED = error_response("Missing, unknown, expired or revoked gateway token")
UNAVAILABLE = error_response("The database (or, with Redis gates, Redis) is unavailable; retry")


class KeyStatusBody(msgspec.Struct):
    configured: bool
    configured_at: Annotated[
        datetime | None,
        msgspec.Meta(description="When the key itself was last stored or rotated (UTC)"),
    ]
    updated_at: Annotated[
        datetime | None,
        msgspec.Meta(description="When the key or its cap last changed (UTC)"),
    ]
    max_concurrent: int | None
    in_use: Annotated[
        int | None,
        msgspec.Meta(
            description=(
                "Requests in flight on this key now, across every worker (its live permit "
                "count); null when no key is stored"
            ),
        ),
    ]


class KeyUpdate(msgspec.Struct, frozen=True):
    key: str | None
    max_concurrent: int | None


def parse_key_update(raw: bytes) -> KeyUpdate:
    """Validate a PUT body in the documented order; every error names the field and the rule."""
    try:
        data: Any = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise InvalidRequest("body: malformed JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("body: must be a JSON object")
    unknown = sorted(set(data) - {"key", "max_concurrent"})
    if unknown:
        raise InvalidRequest(f"{unknown[0]}: unknown field (allowed: key, max_concurrent)")
    key, cap = data.get("key"), data.get("max_concurrent")
    if key is None and cap is None:
        raise InvalidRequest("body: at least one of key, max_concurrent is required")
    if cap is not None:
        if type(cap) is float and cap.is_integer() and MIN_CAP <= cap <= MAX_CAP:
            # JSON has one number type, and JSON Schema's "integer" admits 8.0: the schema
            # promises it, so it is taken (JavaScript cannot even tell 8.0 from 8).
            cap = int(cap)
        if type(cap) is not int:
            raise InvalidRequest(f"max_concurrent: must be an integer from {MIN_CAP} to {MAX_CAP}")
        if not MIN_CAP <= cap <= MAX_CAP:
            raise InvalidRequest(
                f"max_concurrent: must be between {MIN_CAP} and {MAX_CAP}, got {cap}"
            )
    if key is not None:
        if not isinstance(key, str):
            raise InvalidRequest("key: must be a string")
        key = key.strip()
        if not key:
            raise InvalidRequest("key: must not be empty")
        if len(key) > MAX_KEY_LENGTH:
            raise InvalidRequest(f"key: must be at most {MAX_KEY_LENGTH} characters")
        if not key.startswith(KEY_PREFIX):
            raise InvalidRequest(f"key: must start with {KEY_PREFIX!r}")
        if not is_sendable_key(key):
            # It goes out as a header value: anything else could never be sent, or would
            # write a header of its own.
            raise InvalidRequest(
                "key: must hold only visible ASCII characters (no spaces, control "
                "characters or non-ASCII letters)"
            )
    # Last: by now every value is flat, so the second parse is cheap and cannot recurse.
    duplicate = _duplicate_key(raw)
    if duplicate is not None:
        raise InvalidRequest(f"{duplicate}: must appear once, got a duplicate key")
    return KeyUpdate(key=key, max_concurrent=cap)


def _duplicate_key(raw: bytes) -> str | None:
    """The first key that appears twice in one object of the body (msgspec, like most
    parsers, keeps the last silently: which one a client meant is a guess)."""
    found: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _value in items:
            if key in seen and not found:
                found.append(key)
            seen.add(key)
        return dict(items)

    try:
        json.loads(raw, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        raise InvalidRequest("body: malformed JSON") from None
    return found[0] if found else None


async def authenticated_user(request: Request[Any, Any, State]) -> Any:
    token = gateway_token(request.scope["headers"])
    if token is None:
        raise AuthenticationFailed(
            "Missing gateway token: send it as x-api-key or Authorization: Bearer."
        )
    try:
        found = await repository.lookup_token(hash_token(token))
    except StorageError as exc:
        raise _storage_down(exc) from exc
    if found is None:
        raise AuthenticationFailed("Invalid, unknown, expired or revoked gateway token.")
    return found.user_id


def _storage_down(exc: StorageError) -> Exception:
    if isinstance(exc, StorageUnavailable):
        return StorageUnavailableError("The gateway's database is unavailable; retry shortly.")
    log.error("storage error in the settings API: %s", exc)
    return ServerFault("The gateway could not complete the change.")


_KEY_SCHEMA = Schema(
    type=OpenAPIType.STRING,
    max_length=MAX_KEY_LENGTH,
    pattern="^sk-ant-[!-~]*$",
)
_CAP_SCHEMA = Schema(type=OpenAPIType.INTEGER, minimum=MIN_CAP, maximum=MAX_CAP)


@dataclass
class _KeyUpdateOperation(Operation):
    """The PUT body is parsed by hand (for the documented error order); describe it here.

    A dataclass of its own: the ``__init__`` inherited from ``Operation`` never calls a
    ``__post_init__`` that only a subclass defines.
    """

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            required=True,
            content={
                "application/json": OpenAPIMediaType(
                    schema=Schema(
                        type=OpenAPIType.OBJECT,
                        properties={
                            "key": Schema(
                                one_of=[_KEY_SCHEMA, Schema(type=OpenAPIType.NULL)],
                                description="The user's Anthropic API key (write-only); "
                                "null or absent: keep the stored one",
                            ),
                            "max_concurrent": Schema(
                                one_of=[_CAP_SCHEMA, Schema(type=OpenAPIType.NULL)],
                                description="Concurrent requests allowed on this key; null "
                                "or absent: keep the stored cap (8 for a new key)",
                            ),
                        },
                        additional_properties=False,
                        min_properties=1,
                        # At least one of the two, not null.
                        any_of=[
                            Schema(required=["key"], properties={"key": _KEY_SCHEMA}),
                            Schema(
                                required=["max_concurrent"],
                                properties={"max_concurrent": _CAP_SCHEMA},
                            ),
                        ],
                    ),
                    example={"key": "sk-ant-api03-...", "max_concurrent": 8},
                )
            },
        )


class AnthropicKeyController(Controller):
    path = "/api/v1/me/anthropic-key"
    tags = ["settings"]
    # Either header carries the gateway token, as on the proxy.
    security = [{"gatewayToken": []}, {"apiKey": []}]

    @route(http_method=[HttpMethod.OPTIONS], include_in_schema=False, status_code=204)
    async def options(self) -> Response[None]:
        # Litestar's own OPTIONS answer on a controller lists only the last handler's
        # method (DELETE); the resource has all of these.
        return Response(None, status_code=204, headers={"allow": ALLOWED_METHODS})

    @get(
        summary="Whether an Anthropic key is stored, its concurrency cap and the cap in use now",
        responses={401: UNAUTHORIZED, 503: UNAVAILABLE},
    )
    async def status(self, request: Request[Any, Any, State]) -> KeyStatusBody:
        user_id = await authenticated_user(request)
        resources: WorkerResources = request.app.state.resources
        try:
            stored = await repository.key_status(user_id)
            in_use = await resources.credential_in_use(user_id) if stored.configured else None
        except StorageError as exc:
            raise _storage_down(exc) from exc
        return KeyStatusBody(
            configured=stored.configured,
            configured_at=stored.configured_at,
            updated_at=stored.updated_at,
            max_concurrent=stored.max_concurrent,
            in_use=in_use,
        )

    @put(
        status_code=HTTP_204_NO_CONTENT,
        summary="Store or rotate the Anthropic key, and/or change the concurrency cap",
        description=(
            "`key` (starts with sk-ant-, visible ASCII only, at most 256 characters) and "
            "`max_concurrent` "
            "(1..256, default 8 for a new key) are both optional, but not both absent. "
            "Rotating the key without a cap keeps the stored cap. A cap alone needs a "
            "stored key. The new cap applies to the next request in every worker."
        ),
        request_max_body_size=MAX_SETTINGS_BODY,
        operation_class=_KeyUpdateOperation,
        responses={
            400: error_response(
                "Malformed JSON, or a field breaking its rule (the message names both)"
            ),
            401: UNAUTHORIZED,
            413: error_response("The body is larger than 64 KiB"),
            409: error_response("A cap alone while no key is stored: send key as well"),
            415: error_response("The content-type is not application/json"),
            503: UNAVAILABLE,
        },
    )
    async def update(self, request: Request[Any, Any, State]) -> None:
        user_id = await authenticated_user(request)
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise UnsupportedMediaType("content-type: must be application/json")
        try:
            raw = await request.body()
        except HTTPException as exc:
            if exc.status_code == HTTP_413_REQUEST_ENTITY_TOO_LARGE:
                raise PayloadTooLarge(TOO_LARGE_MESSAGE) from None
            raise
        update = parse_key_update(raw)
        resources: WorkerResources = request.app.state.resources
        await resources.before_change()
        try:
            if update.key is None:
                assert update.max_concurrent is not None
                change = await repository.update_cap(user_id, update.max_concurrent)
                if change is None:
                    raise Conflict(
                        "max_concurrent: no Anthropic key configured yet; send key as well"
                    )
            else:
                ciphertext, nonce, key_id = resources.require_keyring().encrypt(
                    update.key, user_id=user_id
                )
                change = await repository.upsert_key(
                    user_id,
                    ciphertext=ciphertext,
                    nonce=nonce,
                    key_id=key_id,
                    max_concurrent=update.max_concurrent,
                )
        except StorageError as exc:
            raise _storage_down(exc) from exc
        await resources.key_changed(change)
        await _audit_change(change, key_sent=update.key is not None)

    @delete(
        summary="Remove the stored Anthropic key (idempotent)",
        responses={401: UNAUTHORIZED, 503: UNAVAILABLE},
    )
    async def remove(self, request: Request[Any, Any, State]) -> None:
        user_id = await authenticated_user(request)
        resources: WorkerResources = request.app.state.resources
        await resources.before_change()
        try:
            change = await repository.delete_key(user_id)
        except StorageError as exc:
            raise _storage_down(exc) from exc
        await resources.key_changed(change)
        if change.previous is not None:
            await _audit_change(change, key_sent=False)


async def _audit_change(change: repository.KeyChange, *, key_sent: bool) -> None:
    """One audit line per committed change (never the key)."""
    try:
        name = await repository.user_name(change.user_id)
    except StorageError:
        name = None  # the change stands; the line still carries the user id
    old = None if change.previous is None else change.previous.max_concurrent
    new = None if change.current is None else change.current.max_concurrent
    if change.current is None:
        event = "key_removed"
    elif key_sent:
        event = "key_stored" if change.previous is None else "key_rotated"
    else:
        event = "cap_changed"
    audit(event, source="api", user=name, user_id=str(change.user_id), old_cap=old, new_cap=new)
