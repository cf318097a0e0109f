"""A fake Anthropic API that speaks real HTTP/1.1 and SSE, steered by the query string.

It serves the gateway's tests, Locust scenarios and benchmarks, hit directly and through
the gateway. The gateway forwards the query string verbatim but only allow-listed
headers, so each request is steered by query parameters laid over process-wide defaults
(``make_app(**defaults)``, ``FakeUpstream.start(**defaults)`` or ``--name value`` flags);
``BEHAVIOUR_HELP`` lists them.

Routes: ``POST /v1/messages`` (JSON, or SSE with ``"stream": true``),
``POST /v1/messages/count_tokens``, ``GET /v1/models[/{id}]``; any other ``/v1/...``
echoes what it received. ``GET /_fake/stats`` serves the ground truth (see
``_fake_parts``), ``POST /_fake/reset`` zeroes it, ``GET /_fake/health`` answers 200.

Command line: ``python -m loadtests.fake_upstream --port 0`` prints one line
``FAKE_UPSTREAM_URL=http://127.0.0.1:PORT`` when ready and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NoReturn, Self

import click
import httpx
import msgspec
from aiohttp import web

from loadtests._fake_parts import (
    BEHAVIOUR_HELP,
    FRAMES_AFTER_DELTAS,
    FRAMES_BEFORE_DELTAS,
    MAX_BODY,
    MODELS,
    RATE_LIMIT_HEADERS,
    Behaviour,
    Ledger,
    MessagesRequest,
    Outcome,
    Seen,
    behaviour_from_query,
    error_envelope,
    lowered_headers,
    message_body,
    models_page,
    new_id,
    stream_frames,
    upstream_key,
)

__all__ = [
    "BEHAVIOUR_HELP",
    "STATE",
    "Behaviour",
    "FakeUpstream",
    "FakeUpstreamError",
    "Ledger",
    "behaviour_from_query",
    "main",
    "make_app",
    "serving",
]

URL_LINE_PREFIX: Final = "FAKE_UPSTREAM_URL="
# serving() cancels a handler whose client hangs up; a runner that does not gets this
# check instead. Every wake-up of a held stream costs CPU, so it is rare.
TICK: Final = 1.0

# The server ----------------------------------------------------------------------------


class ClientGone(Exception):
    """The client closed its connection before the answer was complete."""


class _Cut(Exception):
    """The fake dropped the connection on purpose (``cut_after``)."""


@dataclass(frozen=True, slots=True)
class FakeState:
    defaults: Behaviour
    ledger: Ledger


STATE: Final = web.AppKey("fake_upstream", FakeState)
Route = Callable[[web.Request, Behaviour, dict[str, str], Seen], Awaitable[web.StreamResponse]]


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def pause(request: web.Request, seconds: float) -> None:
    """Sleep; a client that went away meanwhile is noticed within a ``TICK`` at the latest."""
    if seconds <= 0:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        if _client_gone(request):
            raise ClientGone
        left = deadline - loop.time()
        if left <= 0:
            return
        await asyncio.sleep(min(left, TICK))


def _cut(request: web.Request) -> NoReturn:
    if request.transport is not None:
        request.transport.abort()
    raise _Cut


def json_response(data: object, headers: dict[str, str], status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(data),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def error_response(status: int, message: str, headers: dict[str, str]) -> web.Response:
    return json_response(error_envelope(status, message), headers, status)


async def handle_v1(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    path, _, query = request.raw_path.partition("?")
    seen = Seen(
        method=request.method,
        path=path,
        query=query,
        key=upstream_key(request.headers),
        headers=lowered_headers(request.headers.items()),
    )
    state.ledger.enter(seen)
    outcome: Outcome = "failed"
    try:
        response = await _answer(request, state.defaults, seen)
        seen.status = response.status
        outcome = "complete"
        return response
    except _Cut:
        outcome = "cut"
        return web.Response(status=499)  # nobody reads it; aiohttp drops it quietly
    except (ClientGone, ConnectionResetError):
        outcome = "closed_early"
        return web.Response(status=499)
    except asyncio.CancelledError:
        outcome = "closed_early"
        raise
    finally:
        state.ledger.leave(seen, outcome)


async def _answer(request: web.Request, defaults: Behaviour, seen: Seen) -> web.StreamResponse:
    headers = {"request-id": new_id("req"), **RATE_LIMIT_HEADERS}
    if seen.key is None:
        return error_response(
            401, "x-api-key header (or Authorization: Bearer) is required", headers
        )
    try:
        how = behaviour_from_query(request.query, defaults) if seen.query else defaults
    except msgspec.ValidationError as exc:
        return error_response(400, f"fake upstream control parameter: {exc}", headers)
    if how.set_cookie:
        headers["set-cookie"] = f"fake_upstream_session={new_id('sess')}; Path=/; HttpOnly"
    if how.retry_after is not None:
        headers["retry-after"] = f"{how.retry_after:g}"
        headers["x-should-retry"] = "true"
    await pause(request, how.first_delay + how.stall_before_headers)
    if how.redirect is not None:
        headers["location"] = how.redirect
        return web.Response(status=307, headers=headers)
    if how.status is not None:
        return error_response(how.status, f"fake upstream answered {how.status}", headers)
    if how.fail_rate and random.random() < how.fail_rate:
        return error_response(500, "fake upstream failed on purpose (fail_rate)", headers)
    if how.cut_rate and how.cut_after is None and random.random() < how.cut_rate:
        how = msgspec.structs.replace(how, cut_after=2)
    return await _route(request.method, seen.path)(request, how, headers, seen)


def _route(method: str, path: str) -> Route:
    if method == "POST" and path == "/v1/messages":
        return messages
    if method == "POST" and path == "/v1/messages/count_tokens":
        return count_tokens
    if method == "GET" and (path == "/v1/models" or path.startswith("/v1/models/")):
        return models
    return echo


async def messages(
    request: web.Request, how: Behaviour, headers: dict[str, str], seen: Seen
) -> web.StreamResponse:
    body = await request.read()
    try:
        asked = msgspec.json.decode(body, type=MessagesRequest)
    except msgspec.DecodeError as exc:
        return error_response(400, f"request body: {exc}", headers)
    msg_id = new_id("msg")
    input_tokens = max(1, len(body) // 4) if how.input_tokens is None else how.input_tokens
    cache = {"cache_creation": how.cache_creation, "cache_read": how.cache_read}
    if asked.stream:
        frames = stream_frames(
            msg_id=msg_id,
            model=asked.model,
            input_tokens=input_tokens,
            events=how.events,
            **cache,
        )
        return await _stream(request, how, headers, frames)
    answer = message_body(
        msg_id=msg_id,
        model=asked.model,
        input_tokens=input_tokens,
        events=how.events,
        body_bytes=how.body_bytes,
        **cache,
    )
    if how.stall <= 0 and how.cut_after is None:
        return web.Response(body=answer, headers=headers, content_type="application/json")
    headers["content-type"] = "application/json"
    response = web.StreamResponse(headers=headers)
    response.content_length = len(answer)
    await response.prepare(request)
    await pause(request, how.stall)
    if how.cut_after is not None:
        await response.write(answer[: min(how.cut_after, len(answer) - 1)])
        _cut(request)
    await response.write(answer)
    return response


class _HeadersWithFirstWrite(web.StreamResponse):
    # web.Response holds its headers for its first write, a StreamResponse sends them in
    # a syscall of their own; holding them makes a delay=0 stream one write in all. The
    # attribute is aiohttp's private one: if it goes, headers merely go out on their own.
    _send_headers_immediately = False


async def _stream(
    request: web.Request, how: Behaviour, headers: dict[str, str], frames: list[bytes]
) -> web.StreamResponse:
    headers["content-type"] = "text/event-stream; charset=utf-8"
    headers["cache-control"] = "no-cache"
    response = _HeadersWithFirstWrite(headers=headers)
    await response.prepare(request)
    first_delta, after_deltas = FRAMES_BEFORE_DELTAS, len(frames) - FRAMES_AFTER_DELTAS
    if how.eager:
        first_delta += 1
    pending: list[bytes] = []  # frames with no pause between them go out in one write
    for index, frame in enumerate(frames):
        if index == how.cut_after:
            break
        if how.delay and first_delta <= index < after_deltas:
            await response.write(b"".join(pending))
            pending.clear()
            await pause(request, how.delay)
        pending.append(frame)
        if index == 0 and how.stall:
            await response.write(b"".join(pending))
            pending.clear()
            await pause(request, how.stall)
    if how.cut_after is None:
        await response.write_eof(b"".join(pending))
        return response
    await response.write(b"".join(pending))  # even b"" sends the headers still held
    _cut(request)


async def count_tokens(
    request: web.Request, how: Behaviour, headers: dict[str, str], seen: Seen
) -> web.StreamResponse:
    body = await request.read()
    return json_response({"input_tokens": max(1, len(body) // 4)}, headers)


async def models(
    request: web.Request, how: Behaviour, headers: dict[str, str], seen: Seen
) -> web.StreamResponse:
    if seen.path == "/v1/models":
        return json_response(models_page(request.query), headers)
    model_id = seen.path.removeprefix("/v1/models/")
    for model in MODELS:
        if model["id"] == model_id:
            return json_response(model, headers)
    return error_response(404, f"model: {model_id}", headers)


async def echo(
    request: web.Request, how: Behaviour, headers: dict[str, str], seen: Seen
) -> web.StreamResponse:
    digest, length = hashlib.sha256(), 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        length += len(chunk)
    received = {
        "method": seen.method,
        "path": seen.path,
        "query": seen.query,
        "headers": seen.headers,
        "body_length": length,
        "body_sha256": digest.hexdigest(),
    }
    return json_response(received, headers)


async def stats(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].ledger.snapshot(), {})


async def reset(request: web.Request) -> web.Response:
    request.app[STATE].ledger.reset()
    return json_response({"reset": True}, {})


async def health(request: web.Request) -> web.Response:
    return json_response({"ok": True}, {})


def make_app(**defaults: object) -> web.Application:
    """The fake as an aiohttp app; ``defaults`` are ``Behaviour`` fields (``events=10``)."""
    behaviour = msgspec.convert(defaults, Behaviour, strict=False)
    app = web.Application(client_max_size=MAX_BODY)
    app[STATE] = FakeState(behaviour, Ledger())
    app.router.add_get("/_fake/stats", stats)
    app.router.add_post("/_fake/reset", reset)
    app.router.add_get("/_fake/health", health)
    app.router.add_route("*", "/v1/{tail:.*}", handle_v1)
    return app


@asynccontextmanager
async def serving(
    app: web.Application, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve ``app`` in this event loop; yields its base URL (``port=0`` picks a free one)."""
    # No access log: a line per request would cost more than the request itself. A client
    # that hangs up cancels its handler at once, so held streams need no polling.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=4096).start()
        bound_port = runner.addresses[0][1]
        yield f"http://[{host}]:{bound_port}" if ":" in host else f"http://{host}:{bound_port}"
    finally:
        await runner.cleanup()


async def _serve_until_stopped(
    app: web.Application, *, host: str, port: int, parent_pid: int | None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with serving(app, host=host, port=port) as url:
        print(f"{URL_LINE_PREFIX}{url}", flush=True)
        while not stop.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            # A parent that died without stopping us must not leave us running.
            if parent_pid is not None and os.getppid() != parent_pid:
                stop.set()


def _behaviour_options(command: Callable[..., None]) -> Callable[..., None]:
    for name in reversed(Behaviour.__struct_fields__):
        flag = f"--{name.replace('_', '-')}"
        option = click.option(flag, name, default=None, metavar="VALUE", help=BEHAVIOUR_HELP[name])
        command = option(command)
    return command


@click.command(help="Serve a fake Anthropic API; flags set the defaults of the query parameters.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="0 picks a free port")
@click.option("--parent-pid", type=int, default=None, help="exit when this process is gone")
@_behaviour_options
def main(*, host: str, port: int, parent_pid: int | None, **flags: str | None) -> None:
    defaults = {name: value for name, value in flags.items() if value is not None}
    try:
        app = make_app(**defaults)
    except msgspec.ValidationError as exc:
        raise click.UsageError(str(exc)) from exc
    asyncio.run(_serve_until_stopped(app, host=host, port=port, parent_pid=parent_pid))


# Driving it from a test, a Locust file or a script ------------------------------------


class FakeUpstreamError(Exception):
    """The fake upstream process did not start, or did not answer a control request."""


class FakeUpstream:
    """A fake upstream in a subprocess of its own, with its URL, pid and ground truth."""

    def __init__(self, process: subprocess.Popen[bytes], url: str) -> None:
        self.url = url
        self.pid = process.pid
        self._process = process
        self._control = httpx.Client(base_url=url, timeout=10.0)

    @classmethod
    def start(
        cls,
        *,
        events: int = 5,
        delay: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout: float = 15.0,
        **defaults: object,
    ) -> FakeUpstream:
        """Start ``python -m loadtests.fake_upstream`` and wait for its URL line.

        ``defaults`` are further ``Behaviour`` fields, such as ``first_delay=0.5``.
        """
        flags = {"events": events, "delay": delay, **defaults}
        command = [
            sys.executable,
            "-m",
            "loadtests.fake_upstream",
            "--host",
            host,
            "--port",
            str(port),
            "--parent-pid",
            str(os.getpid()),
        ]
        for name, value in flags.items():
            text = str(int(value)) if isinstance(value, bool) else str(value)
            command += [f"--{name.replace('_', '-')}", text]
        # Import this very checkout, whatever the caller's working directory.
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        process = subprocess.Popen(command, stdout=subprocess.PIPE, env=env)
        try:
            url = _read_url_line(process, timeout=startup_timeout)
        except BaseException:
            _terminate(process, timeout=2.0)
            raise
        return cls(process, url)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._control_call("GET", "/_fake/stats").json()
        return result

    def reset(self) -> None:
        self._control_call("POST", "/_fake/reset")

    def stop(self, *, timeout: float = 5.0) -> None:
        """SIGTERM this process (by its pid only), then SIGKILL if it has not gone in time."""
        self._control.close()
        _terminate(self._process, timeout=timeout)

    def _control_call(self, method: str, path: str) -> httpx.Response:
        try:
            response = self._control.request(method, path)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise FakeUpstreamError(f"{method} {self.url}{path}: {exc}") from exc
        return response

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"FakeUpstream(url={self.url!r}, pid={self.pid})"


def _read_url_line(process: subprocess.Popen[bytes], *, timeout: float) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    received = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while b"\n" not in received:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FakeUpstreamError(f"fake upstream printed no URL within {timeout:g} s")
            if not selector.select(left):
                continue
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                code = process.wait(timeout=5)
                raise FakeUpstreamError(
                    f"fake upstream exited with code {code} before it was ready (its stderr "
                    "went to this process's stderr)"
                )
            received += chunk
    line = received.split(b"\n", 1)[0].decode(errors="replace").strip()
    if not line.startswith(URL_LINE_PREFIX):
        raise FakeUpstreamError(f"fake upstream printed {line!r}, not {URL_LINE_PREFIX}URL")
    return line.removeprefix(URL_LINE_PREFIX)


def _terminate(process: subprocess.Popen[bytes], *, timeout: float) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


if __name__ == "__main__":
    main()
