"""Locust scenarios for the gateway's concurrency caps, against any running gateway.

    GATEWAY_LOAD_TOKENS=gwt_a,gwt_b,gwt_c locust -f loadtests/locustfile.py \\
        --host http://127.0.0.1:8080 --headless -u 60 -r 20 --run-time 1m

    # pace the fake upstream (the gateway forwards the query string verbatim)
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8080 \\
        --gateway-tokens gwt_a,gwt_b --stream-events 20 --stream-delay 0.05 HotStreamer

User classes (pick some by naming them last on the command line):

- ``HotStreamer``: SSE streams on one credential (``--hot-token``, default the first
  token); run several times that key's cap of them.
- ``SpreadStreamer``: SSE streams spread round-robin over the other tokens, each key under
  its cap, all of them together over the global cap.
- ``ChurnUser``: short non-streamed messages, and streams it drops after
  ``--drop-after`` events (round-robin over ``--churn-tokens``).
- ``CapChangeStreamer`` and ``CapChanger``: streams on ``--cap-change-token`` while one
  user cycles that key's ``max_concurrent`` through ``--cap-change-values`` via the
  settings API. Both only run when ``--cap-change-token`` is given: the changer rewrites
  a stored setting.
- ``QueueStreamer``: streams on ``--queue-token`` against a gateway with its waiting line
  on (``GATEWAY_QUEUE_TIMEOUT``); run three times that key's cap of them. Each request
  carries ``seq=N`` in its query (its place in the order they were sent), so the
  upstream's own record tells how close to first come, first served the line was. Only
  runs when ``--queue-token`` is given.

Entries: a stream records ``SSE /v1/messages first event`` (time to the first SSE event)
and ``SSE /v1/messages whole stream`` (time to its end) apart; a 429 records
``429 /v1/messages overloaded (SCOPE)`` as a success when it is a well-formed
``overloaded_error`` with ``retry-after`` and as a failure otherwise; anything else that
is not a 200 is a failure of the request's own entry. Every event carries
``context["status"]`` (0 for a connection error) except ``first event``.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar, Final
from urllib.parse import urlencode

import gevent
from locust import FastHttpUser, events, task
from locust.exception import StopUser

from loadtests._capacity_wire import (
    SCOPE_HEADER,
    overload_problem,
    retry_wait,
    sse_event,
    stream_problem,
)

log = logging.getLogger("loadtests.locustfile")

SSE: Final = "SSE"
REJECTED: Final = "429"
FIRST_EVENT: Final = "/v1/messages first event"
WHOLE_STREAM: Final = "/v1/messages whole stream"
DROPPED_STREAM: Final = "/v1/messages dropped stream"
SHORT_MESSAGE: Final = "/v1/messages"
CAP_CHANGE: Final = "/api/v1/me/anthropic-key max_concurrent"
OVERLOADED_PREFIX: Final = "/v1/messages overloaded"
DEFAULT_MODEL: Final = "claude-sonnet-4-20250514"
ANTHROPIC_VERSION: Final = "2023-06-01"
ALL_STATUSES: Final = frozenset(range(100, 600))


def overloaded_name(scope: str | None) -> str:
    """The entry of a 429; a 429 without the gateway's scope header came from upstream."""
    return f"{OVERLOADED_PREFIX} ({scope or 'upstream'})"


class BadAnswer(Exception):
    """The gateway answered, but not as it should have (wrong status, shape or stream)."""


# Options -------------------------------------------------------------------------------


def add_gateway_options(parser: Any, **_: Any) -> None:
    parser.add_argument(
        "--gateway-tokens",
        env_var="GATEWAY_LOAD_TOKENS",
        default="",
        is_secret=True,
        help="Comma-separated gateway tokens (one per credential).",
    )
    parser.add_argument(
        "--gateway-model", env_var="GATEWAY_LOAD_MODEL", default=DEFAULT_MODEL, help="Model."
    )
    parser.add_argument(
        "--hot-token",
        env_var="GATEWAY_LOAD_HOT_TOKEN",
        default="",
        is_secret=True,
        help="HotStreamer's token (default: the first of --gateway-tokens).",
    )
    parser.add_argument(
        "--churn-tokens",
        env_var="GATEWAY_LOAD_CHURN_TOKENS",
        default="",
        is_secret=True,
        help="ChurnUser's tokens, comma-separated (default: SpreadStreamer's).",
    )
    parser.add_argument(
        "--cap-change-token",
        env_var="GATEWAY_LOAD_CAP_CHANGE_TOKEN",
        default="",
        is_secret=True,
        help="The token whose cap CapChanger cycles (no token: no cap-change scenario).",
    )
    parser.add_argument(
        "--queue-token",
        env_var="GATEWAY_LOAD_QUEUE_TOKEN",
        default="",
        is_secret=True,
        help="QueueStreamer's token (no token: no queue scenario).",
    )
    parser.add_argument(
        "--cap-change-values",
        env_var="GATEWAY_LOAD_CAP_CHANGE_VALUES",
        default="4,12",
        help="The max_concurrent values CapChanger cycles through.",
    )
    parser.add_argument(
        "--cap-change-every",
        env_var="GATEWAY_LOAD_CAP_CHANGE_EVERY",
        type=float,
        default=5.0,
        help="Seconds between two cap changes.",
    )
    parser.add_argument(
        "--stream-events",
        env_var="GATEWAY_LOAD_STREAM_EVENTS",
        type=int,
        default=None,
        help="Send ?events=N (the fake upstream's text deltas per stream).",
    )
    parser.add_argument(
        "--stream-delay",
        env_var="GATEWAY_LOAD_STREAM_DELAY",
        type=float,
        default=None,
        help="Send ?delay=S (the fake upstream's seconds before each delta).",
    )
    parser.add_argument(
        "--upstream-query",
        env_var="GATEWAY_LOAD_UPSTREAM_QUERY",
        default="",
        help="More query string for /v1/messages, e.g. first_delay=0.2 (fake upstream only).",
    )
    parser.add_argument(
        "--drop-after",
        env_var="GATEWAY_LOAD_DROP_AFTER",
        type=int,
        default=3,
        help="ChurnUser hangs up a stream after this many SSE events.",
    )
    parser.add_argument(
        "--max-retry-wait",
        env_var="GATEWAY_LOAD_MAX_RETRY_WAIT",
        type=float,
        default=5.0,
        help="After a 429 wait retry-after x U(0.5, 1) seconds, at most this long.",
    )


@dataclass(frozen=True, kw_only=True)
class LoadOptions:
    tokens: tuple[str, ...] = field(repr=False)
    model: str
    hot_token: str | None = field(repr=False)
    spread_tokens: tuple[str, ...] = field(repr=False)
    churn_tokens: tuple[str, ...] = field(repr=False)
    cap_change_token: str | None = field(repr=False)
    queue_token: str | None = field(repr=False)
    cap_change_values: tuple[int, ...]
    cap_change_every: float
    query: str
    drop_after: int
    max_retry_wait: float


def _split(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


@lru_cache(maxsize=8)
def _options(
    tokens: str,
    model: str,
    hot: str,
    churn: str,
    change: str,
    queue: str,
    change_values: str,
    change_every: float,
    query: str,
    drop_after: int,
    max_retry_wait: float,
) -> LoadOptions:
    all_tokens = _split(tokens)
    hot_token = hot.strip() or (all_tokens[0] if all_tokens else None)
    change_token = change.strip() or None
    spread = tuple(t for t in all_tokens if t not in (hot_token, change_token)) or all_tokens
    try:
        values = tuple(int(v) for v in _split(change_values))
    except ValueError:
        raise ValueError(f"--cap-change-values: integers, got {change_values!r}") from None
    if not values:
        raise ValueError("--cap-change-values: at least one value")
    return LoadOptions(
        tokens=all_tokens,
        model=model,
        hot_token=hot_token,
        spread_tokens=spread,
        churn_tokens=_split(churn) or spread,
        cap_change_token=change_token,
        queue_token=queue.strip() or None,
        cap_change_values=values,
        cap_change_every=change_every,
        query=query,
        drop_after=max(1, drop_after),
        max_retry_wait=max(0.0, max_retry_wait),
    )


def load_options(parsed: Any) -> LoadOptions:
    """The typed options from Locust's parsed options (flags, environment, web UI)."""
    pacing = {"events": parsed.stream_events, "delay": parsed.stream_delay}
    parts = [urlencode({k: v for k, v in pacing.items() if v is not None}), parsed.upstream_query]
    query = "&".join(part.lstrip("?&") for part in parts if part)
    return _options(
        parsed.gateway_tokens,
        parsed.gateway_model,
        parsed.hot_token,
        parsed.churn_tokens,
        parsed.cap_change_token,
        parsed.queue_token,
        parsed.cap_change_values,
        float(parsed.cap_change_every),
        query,
        int(parsed.drop_after),
        float(parsed.max_retry_wait),
    )


def check_options(environment: Any, **_: Any) -> None:
    parsed = environment.parsed_options
    if parsed is None:
        return
    try:
        options = load_options(parsed)
    except ValueError as exc:
        raise SystemExit(f"locustfile: {exc}") from None
    if not options.tokens and getattr(parsed, "headless", False):
        raise SystemExit("locustfile: set GATEWAY_LOAD_TOKENS or --gateway-tokens")
    if options.cap_change_token is None:
        # The cap-change scenario rewrites a stored setting: never without an explicit token.
        keep = [u for u in environment.user_classes if not getattr(u, "needs_cap_token", False)]
        if keep and len(keep) < len(environment.user_classes):
            log.info("no --cap-change-token: CapChanger and CapChangeStreamer stay idle")
            environment.user_classes[:] = keep
    if options.queue_token is None:
        keep = [u for u in environment.user_classes if u.__name__ != "QueueStreamer"]
        if keep and len(keep) < len(environment.user_classes):
            environment.user_classes[:] = keep


_hooks: Any = events  # Locust's EventHook.add_listener is untyped
_hooks.init_command_line_parser.add_listener(add_gateway_options)
_hooks.init.add_listener(check_options)


# Users ---------------------------------------------------------------------------------


class GatewayUser(FastHttpUser):
    """Talks to the gateway with geventhttpclient directly, to time SSE events itself."""

    abstract = True
    network_timeout = 120.0
    connection_timeout = 10.0
    concurrency = 1
    needs_cap_token: ClassVar[bool] = False
    think_time: ClassVar[float] = 0.05

    options: LoadOptions
    token: str
    _turns: ClassVar[Iterator[int]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._turns = itertools.count()  # round-robin over tokens, per class

    def wait_time(self) -> float:
        return random.uniform(0.0, self.think_time)

    def on_start(self) -> None:
        self.options = load_options(self.environment.parsed_options)
        tokens = self.pick_tokens()
        if not tokens:
            log.error("%s: no token to use (see --help, gateway options)", type(self).__name__)
            raise StopUser
        self.token = tokens[next(self._turns) % len(tokens)]
        # Every status comes back as a response to judge here (geventhttpclient would raise
        # and release a 429 before its body is read); redirects are not followed. The
        # agent is this user's own, so shadowing its class attributes touches no one else.
        agent = self.client.client
        agent.valid_response_codes = ALL_STATUSES  # type: ignore[misc]
        agent.redirect_response_codes = frozenset()  # type: ignore[misc]

    def pick_tokens(self) -> tuple[str, ...]:
        return self.options.spread_tokens

    # Requests --------------------------------------------------------------------------

    def messages_path(self) -> str:
        return f"/v1/messages?{self.options.query}" if self.options.query else "/v1/messages"

    def message_body(self, *, stream: bool) -> bytes:
        body = {
            "model": self.options.model,
            "max_tokens": 64,
            "stream": stream,
            "messages": [{"role": "user", "content": "Say hello."}],
        }
        return json.dumps(body).encode()

    def open(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> Any:
        """Send; the response comes back once its headers are in (or a connection error)."""
        return self.client.client.urlopen(
            f"{self.host}{path}", method=method, payload=body, headers=headers
        )

    def gateway_headers(self, *, accept: str) -> dict[str, str]:
        return {
            "x-api-key": self.token,
            "anthropic-version": ANTHROPIC_VERSION,
            "content-type": "application/json",
            "accept": accept,
            "accept-encoding": "identity",
        }

    def record(
        self,
        kind: str,
        name: str,
        *,
        started: float,
        length: int,
        status: int | None,
        exception: Exception | None = None,
        **context: Any,
    ) -> None:
        if status is not None:
            context["status"] = status
        self.environment.events.request.fire(
            request_type=kind,
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=exception,
            context=context,
            start_time=time.time() - (time.perf_counter() - started),
            url=name,
            response=None,
        )

    def stream(self, *, drop_after: int | None = None) -> None:
        """One streamed message: first event and whole stream (or the drop) apart."""
        started = time.perf_counter()
        try:
            response = self.open(
                "POST",
                self.messages_path(),
                self.message_body(stream=True),
                self.gateway_headers(accept="text/event-stream"),
            )
        except Exception as exc:
            self.record(SSE, WHOLE_STREAM, started=started, length=0, status=0, exception=exc)
            return
        status = response.status_code
        if status != 200:
            self.not_ok(response, SSE, WHOLE_STREAM, started=started)
            return
        raw = response._response  # geventhttpclient's parser: SSE frames as they arrive
        received = events_seen = 0
        first: str | None = None
        last: str | None = None
        error: bytes | None = None
        try:
            while frame := raw.readline(b"\n\n"):
                received += len(frame)
                events_seen += 1
                last, data = sse_event(frame)
                if first is None:
                    first = last
                    self.record(SSE, FIRST_EVENT, started=started, length=received, status=None)
                if last == "error":
                    error = data
                if drop_after is not None and events_seen >= drop_after:
                    hang_up(raw)
                    self.record(
                        SSE, DROPPED_STREAM, started=started, length=received, status=status
                    )
                    return
        except Exception as exc:
            self.record(
                SSE, WHOLE_STREAM, started=started, length=received, status=status, exception=exc
            )
            return
        problem = stream_problem(first=first, last=last, error=error)
        self.record(
            SSE,
            WHOLE_STREAM,
            started=started,
            length=received,
            status=status,
            exception=BadAnswer(problem) if problem else None,
        )

    def short_message(self) -> None:
        started = time.perf_counter()
        try:
            response = self.open(
                "POST",
                self.messages_path(),
                self.message_body(stream=False),
                self.gateway_headers(accept="application/json"),
            )
            if response.status_code != 200:
                self.not_ok(response, "POST", SHORT_MESSAGE, started=started)
                return
            body = response.content or b""
        except Exception as exc:
            self.record("POST", SHORT_MESSAGE, started=started, length=0, status=0, exception=exc)
            return
        problem = None if b'"type":"message"' in body.replace(b" ", b"") else "not a message"
        self.record(
            "POST",
            SHORT_MESSAGE,
            started=started,
            length=len(body),
            status=200,
            exception=BadAnswer(f"{problem}: {body[:120]!r}") if problem else None,
        )

    def not_ok(self, response: Any, kind: str, name: str, *, started: float) -> None:
        """A non-200: a 429 goes to its own entry (then backs off), the rest fail ``name``."""
        status = int(response.status_code)
        try:
            body = response.content or b""
        except Exception:
            body = b""
        headers = {str(k).lower(): str(v) for k, v in response.headers.items()}
        if status != 429:
            failure = BadAnswer(f"HTTP {status}: {body[:160]!r}")
            self.record(
                kind, name, started=started, length=len(body), status=status, exception=failure
            )
            return
        scope = headers.get(SCOPE_HEADER)
        problem = overload_problem(headers, body)
        self.record(
            REJECTED,
            overloaded_name(scope),
            started=started,
            length=len(body),
            status=429,
            exception=BadAnswer(f"malformed 429: {problem}") if problem else None,
            scope=scope,
        )
        gevent.sleep(
            retry_wait(
                headers.get("retry-after"),
                longest=self.options.max_retry_wait,
                jitter=random.uniform(0.5, 1.0),
            )
        )


def hang_up(raw: Any) -> None:
    """Close a streamed response's connection mid-body (never back into the pool)."""
    # geventhttpclient returns a response's socket to its pool on release; a half-read
    # stream must not be reused, so close the socket and tell the pool it is gone.
    sock, pool = getattr(raw, "_sock", None), getattr(raw, "_pool", None)
    raw._sock = None
    raw._pool = None
    if sock is not None and pool is not None:
        pool.release_socket(sock)
    elif sock is not None:
        sock.close()


class HotStreamer(GatewayUser):
    """SSE streams on one credential; run several times its cap of these."""

    weight = 2

    def pick_tokens(self) -> tuple[str, ...]:
        return (self.options.hot_token,) if self.options.hot_token else ()

    @task
    def stream_on_hot_key(self) -> None:
        self.stream()


class SpreadStreamer(GatewayUser):
    """SSE streams round-robin over many credentials, each under its cap."""

    weight = 4

    @task
    def stream_on_own_key(self) -> None:
        self.stream()


class ChurnUser(GatewayUser):
    """Short requests, and streams hung up after a few events."""

    weight = 2

    def pick_tokens(self) -> tuple[str, ...]:
        return self.options.churn_tokens

    @task
    def short(self) -> None:
        self.short_message()

    @task
    def dropped_stream(self) -> None:
        self.stream(drop_after=self.options.drop_after)


class CapChangeStreamer(GatewayUser):
    """SSE streams on the credential whose cap CapChanger keeps changing."""

    weight = 1
    needs_cap_token = True

    def pick_tokens(self) -> tuple[str, ...]:
        token = self.options.cap_change_token
        return (token,) if token else ()

    @task
    def stream_on_changing_key(self) -> None:
        self.stream()


class CapChanger(GatewayUser):
    """Cycles the cap of ``--cap-change-token`` through the settings API while load runs."""

    fixed_count = 1
    needs_cap_token = True
    _values: Iterator[int]

    def pick_tokens(self) -> tuple[str, ...]:
        token = self.options.cap_change_token
        return (token,) if token else ()

    def on_start(self) -> None:
        super().on_start()
        self._values = itertools.cycle(self.options.cap_change_values)

    def wait_time(self) -> float:
        return self.options.cap_change_every

    @task
    def change_cap(self) -> None:
        cap = next(self._values)
        started = time.perf_counter()
        headers = {"authorization": f"Bearer {self.token}", "content-type": "application/json"}
        body = json.dumps({"max_concurrent": cap}).encode()
        try:
            response = self.open("PUT", "/api/v1/me/anthropic-key", body, headers)
            status = int(response.status_code)
            text = response.content or b""
        except Exception as exc:
            self.record(
                "PUT", CAP_CHANGE, started=started, length=0, status=0, exception=exc, cap=cap
            )
            return
        failure = None if status == 204 else BadAnswer(f"HTTP {status}: {text[:160]!r}")
        self.record(
            "PUT",
            CAP_CHANGE,
            started=started,
            length=len(text),
            status=status,
            exception=failure,
            cap=cap,
        )


class QueueStreamer(GatewayUser):
    """SSE streams on ``--queue-token`` against a gateway whose waiting line is on."""

    weight = 1
    _sent: ClassVar[Iterator[int]] = itertools.count()

    def pick_tokens(self) -> tuple[str, ...]:
        return (self.options.queue_token,) if self.options.queue_token else ()

    def messages_path(self) -> str:
        # Numbered as sent (greenlets of one process: the order is exact), for the FIFO
        # measurement against the order the upstream saw them.
        joiner = "&" if self.options.query else "?"
        return f"{super().messages_path()}{joiner}seq={next(self._sent)}"

    @task
    def stream_in_line(self) -> None:
        self.stream()
