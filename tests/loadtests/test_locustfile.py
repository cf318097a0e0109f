"""The Locust scenarios: the rules they judge answers by, and real runs against a gateway.

Locust monkey-patches the standard library with gevent when imported, so it never runs in
the pytest process: the locustfile runs as an operator runs it, ``locust -f ... --headless``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtests._capacity_wire import (
    overload_problem,
    retry_wait,
    sse_event,
    stream_problem,
)
from tests.fixtures.gateway import ROOT, GatewayProcess

LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
OVERLOADED = b'{"type":"error","error":{"type":"overloaded_error","message":"Retry shortly."}}'
CLASSES = [
    "HotStreamer",
    "SpreadStreamer",
    "ChurnUser",
    "CapChangeStreamer",
    "CapChanger",
    "QueueStreamer",
]

# Names the locustfile records under (duplicated on purpose: they are its interface).
FIRST_EVENT = ("SSE", "/v1/messages first event")
WHOLE_STREAM = ("SSE", "/v1/messages whole stream")
DROPPED = ("SSE", "/v1/messages dropped stream")
SHORT = ("POST", "/v1/messages")
CAP_CHANGE = ("PUT", "/api/v1/me/anthropic-key max_concurrent")
REJECTED_CREDENTIAL = ("429", "/v1/messages overloaded (credential)")
REJECTED_UPSTREAM = ("429", "/v1/messages overloaded (upstream)")


# The rules, in this process --------------------------------------------------------------


def test_a_well_formed_overload_answer_passes() -> None:
    assert overload_problem({"retry-after": "1"}, OVERLOADED) is None
    assert overload_problem({"retry-after": "0.5"}, OVERLOADED) is None


@pytest.mark.parametrize(
    ("headers", "body", "problem"),
    [
        ({}, OVERLOADED, "no retry-after"),
        ({"retry-after": "soon"}, OVERLOADED, "not a number"),
        ({"retry-after": "-1"}, OVERLOADED, "not a number"),
        ({"retry-after": "1"}, b"Too Many Requests", "not JSON"),
        ({"retry-after": "1"}, b"[]", "envelope"),
        (
            {"retry-after": "1"},
            b'{"type":"error","error":{"type":"rate_limit_error","message":"x"}}',
            "rate_limit_error",
        ),
        ({"retry-after": "1"}, b'{"type":"error","error":{"type":"overloaded_error"}}', "message"),
    ],
)
def test_a_malformed_429_is_named(headers: dict[str, str], body: bytes, problem: str) -> None:
    found = overload_problem(headers, body)
    assert found is not None and problem in found


def test_back_off_follows_retry_after_within_bounds() -> None:
    assert retry_wait("2", longest=5.0, jitter=0.5) == 1.0
    assert retry_wait("30", longest=5.0, jitter=1.0) == 5.0
    assert retry_wait(None, longest=5.0, jitter=1.0) == 1.0
    assert retry_wait("nonsense", longest=0.25, jitter=1.0) == 0.25


def test_sse_frames_and_stream_shape() -> None:
    assert sse_event(b'event: message_start\ndata: {"a": 1}\n\n') == (
        "message_start",
        b'{"a": 1}',
    )
    assert sse_event(b"data: x\n\n") == ("message", b"x")
    assert stream_problem(first="message_start", last="message_stop", error=None) is None
    assert "error event" in (stream_problem(first="message_start", last="error", error=b"{}") or "")
    assert "ended with" in (stream_problem(first="message_start", last="ping", error=None) or "")
    assert "before any event" in (stream_problem(first=None, last=None, error=None) or "")


# The locustfile as an operator runs it ----------------------------------------------------


def locust(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


def test_the_locustfile_imports_and_lists_its_user_classes() -> None:
    result = locust("--list")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-len(CLASSES) :] == CLASSES


def test_headless_without_tokens_stops_with_a_message(tmp_path: Path) -> None:
    env = {k: v for k, v in _clean_env().items() if not k.startswith("GATEWAY_LOAD_")}
    result = locust("--headless", "--host", "http://127.0.0.1:9", "-t", "1s", env=env)
    assert result.returncode != 0
    assert "GATEWAY_LOAD_TOKENS" in result.stderr


def run_headless(
    gateway: GatewayProcess,
    tmp_path: Path,
    *args: str,
    tokens: dict[str, str],
    users: int,
    seconds: int,
) -> tuple[int, dict[tuple[str, str], dict[str, Any]], str]:
    """Run the locustfile against ``gateway``; its exit code, entries by (type, name), log."""
    env = {**_clean_env(), **tokens}
    out = tmp_path / "stats"
    result = locust(
        "--headless",
        "--host", gateway.url,
        "-u", str(users),
        "-r", str(users),
        "-t", f"{seconds}s",
        "--json-file", str(out),
        "--loglevel", "WARNING",
        *args,
        env=env,
    )  # fmt: skip
    entries = json.loads(Path(f"{out}.json").read_text())
    by_name = {(e["method"], e["name"]): e for e in entries}
    return result.returncode, by_name, result.stderr[-3000:]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "LOCUST_"))}


@pytest.mark.slow
def test_every_scenario_runs_against_a_real_gateway(
    start_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    gateway = start_gateway(workers=2)
    hot, _ = gateway.user_with_key("hot", cap=1)
    change, _ = gateway.user_with_key("change", cap=3)
    spread = [gateway.user_with_key(f"spread{i}", cap=4)[0] for i in range(2)]
    code, entries, log = run_headless(
        gateway,
        tmp_path,
        "--stream-events", "5",
        "--stream-delay", "0.1",
        "--max-retry-wait", "0.1",
        "--cap-change-values", "1,2",
        "--cap-change-every", "1",
        tokens={
            "GATEWAY_LOAD_TOKENS": ",".join([hot, *spread]),
            "GATEWAY_LOAD_CAP_CHANGE_TOKEN": change,
        },
        users=12,
        seconds=5,
    )  # fmt: skip
    assert code == 0, log
    for entry in (FIRST_EVENT, WHOLE_STREAM, DROPPED, SHORT, CAP_CHANGE, REJECTED_CREDENTIAL):
        assert entries.get(entry, {}).get("num_requests", 0) > 0, (entry, sorted(entries))
    assert all(e["num_failures"] == 0 for e in entries.values()), entries
    # Time to first event and whole-stream time are separate entries, counted per stream.
    assert entries[FIRST_EVENT]["num_requests"] >= entries[WHOLE_STREAM]["num_requests"]
    first = entries[FIRST_EVENT]
    whole = entries[WHOLE_STREAM]
    assert first["total_response_time"] / first["num_requests"] < (
        whole["total_response_time"] / whole["num_requests"]
    )
    # A 429 is its own entry, never a failure of the stream it refused.
    assert entries[REJECTED_CREDENTIAL]["num_failures"] == 0
    # CapChanger went through the settings API: the cap it left is one it cycles through.
    stored = httpx.get(
        f"{gateway.url}/api/v1/me/anthropic-key",
        headers={"authorization": f"Bearer {change}"},
        timeout=10,
    ).json()
    assert stored["max_concurrent"] in (1, 2)


@pytest.mark.slow
def test_a_malformed_429_is_a_failure(
    start_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    """The upstream's own 429 (rate_limit_error, no retry-after) passes through unchanged."""
    gateway = start_gateway(workers=1)
    token, _ = gateway.user_with_key("limited", cap=4)
    code, entries, _log = run_headless(
        gateway,
        tmp_path,
        "--upstream-query", "status=429",
        "--max-retry-wait", "0.1",
        "SpreadStreamer",
        tokens={"GATEWAY_LOAD_TOKENS": token},
        users=2,
        seconds=2,
    )  # fmt: skip
    assert code != 0
    rejected = entries[REJECTED_UPSTREAM]
    assert rejected["num_requests"] > 0
    assert rejected["num_failures"] == rejected["num_requests"]
    assert WHOLE_STREAM not in entries
