"""Errors the gateway answers itself, shaped as Anthropic's error envelope.

    GatewayError                         status  error.type
    ├── InvalidRequest                   400     invalid_request_error
    ├── AuthenticationFailed             401     authentication_error
    ├── NotFound                         404     not_found_error
    ├── Conflict                         409     invalid_request_error (a cap with no key)
    ├── RequestTimeout                   408     invalid_request_error (a body too slow)
    ├── PayloadTooLarge                  413     request_too_large (Anthropic's own type)
    ├── UnsupportedMediaType             415     invalid_request_error
    ├── Overloaded                       429     overloaded_error (+ retry-after)
    ├── ServerFault                      500     api_error (master key missing, decryption)
    ├── UpstreamUnavailable              502     api_error
    ├── UpstreamTimeout                  504     api_error
    ├── StorageUnavailableError          503     api_error
    └── CoordinationUnavailable          503     api_error (Redis gates: + retry-after)

Upstream error responses are never wrapped: they pass through unchanged. Each error also
names its ``outcome``: the access log's field and the ``outcome`` label of
``gateway_requests_total``.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec


class _ErrorDetail(msgspec.Struct):
    type: str
    message: str


class _ErrorEnvelope(msgspec.Struct, tag_field="type", tag="error"):
    error: _ErrorDetail


_encoder = msgspec.json.Encoder()


def error_body(kind: str, message: str) -> bytes:
    return _encoder.encode(_ErrorEnvelope(error=_ErrorDetail(type=kind, message=message)))


class GatewayError(Exception):
    status: ClassVar[int] = 500
    kind: ClassVar[str] = "api_error"
    outcome: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.kind, self.message)


class InvalidRequest(GatewayError):
    status = 400
    kind = "invalid_request_error"
    outcome = "invalid_request"


class AuthenticationFailed(GatewayError):
    status = 401
    kind = "authentication_error"
    outcome = "auth_failed"


class NotFound(GatewayError):
    status = 404
    kind = "not_found_error"
    outcome = "invalid_request"


class RequestTimeout(GatewayError):
    status = 408
    kind = "invalid_request_error"  # Anthropic's type for any 4xx it has no own type for
    outcome = "invalid_request"


class Conflict(GatewayError):
    status = 409
    kind = "invalid_request_error"
    outcome = "invalid_request"


class PayloadTooLarge(GatewayError):
    status = 413
    kind = "request_too_large"
    outcome = "invalid_request"


class UnsupportedMediaType(GatewayError):
    status = 415
    kind = "invalid_request_error"
    outcome = "invalid_request"


class Overloaded(GatewayError):
    status = 429
    kind = "overloaded_error"
    outcome = "rejected"


class ServerFault(GatewayError):
    status = 500
    kind = "api_error"


class UpstreamUnavailable(GatewayError):
    status = 502
    kind = "api_error"
    outcome = "upstream_unavailable"


class StorageUnavailableError(GatewayError):
    status = 503
    kind = "api_error"


class UpstreamTimeout(GatewayError):
    status = 504
    kind = "api_error"
    outcome = "upstream_timeout"


class CoordinationUnavailable(GatewayError):
    """The shared gates' store (Redis) does not answer: fail closed, never count per host."""

    status = 503
    kind = "api_error"
