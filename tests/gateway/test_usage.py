"""Token usage through a real gateway: metered from the relayed answers, stored, read back.

The fake upstream reports known usage (``input_tokens``, ``cache_creation``, ``cache_read``
query parameters; output = ``events``; the closing ``message_delta`` repeats the input side
cumulatively). Every test runs on SQLite and on a fresh Postgres database.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import anthropic
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.databases import _admin, _run_in_thread
from tests.fixtures.gateway import HOLD_QUERY, GatewayProcess, held_streams

USAGE_PATH = "/api/v1/me/usage"
MESSAGE: dict[str, Any] = {
    "model": "claude-test",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "hi"}],
}
# What the fake reports for each /v1/messages answer in these tests.
KNOWN = {"input_tokens": "100", "cache_creation": "7", "cache_read": "11", "events": "4"}
FAST_FLUSH = {"GATEWAY_USAGE_FLUSH_INTERVAL": "0.2"}


@pytest.fixture
def gateway_database_url(database_url: str) -> str:
    return database_url


def usage(gateway: GatewayProcess, token: str, **params: str) -> httpx.Response:
    return httpx.get(
        f"{gateway.url}{USAGE_PATH}",
        params=params,
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
    )


def wait_for_totals(
    gateway: GatewayProcess,
    token: str,
    done: Callable[[dict[str, int]], bool],
    timeout: float = 20.0,
) -> dict[str, Any]:
    """The usage report once ``done(totals)`` holds (workers flush every few tenths)."""
    deadline = time.monotonic() + timeout
    while True:
        response = usage(gateway, token, group_by="model")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if done(body["totals"]) or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def by_model(body: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {row["model"]: row for row in body["rows"]}


def test_sdk_raw_sse_and_json_answers_add_up_exactly(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(**FAST_FLUSH)
    token, _ = gateway.user_with_key("alice")
    other, _ = gateway.user_with_key("bob")
    client = anthropic.Anthropic(base_url=gateway.url, api_key=token, max_retries=0)
    # Two non-streamed and two streamed through the SDK, one raw SSE stream with CRLF-free
    # framing read by httpx, one count_tokens (a request, no tokens).
    for _ in range(2):
        client.messages.create(**MESSAGE, extra_query=KNOWN)
    for _ in range(2):
        with client.messages.stream(**MESSAGE, extra_query=KNOWN) as stream:
            final = stream.get_final_message()
        # The SDK itself adds message_delta's usage to message_start's: what it shows is
        # what the upstream reported, and what the gateway must count.
        assert final.usage.output_tokens == 4
        assert final.usage.input_tokens == 100
    response = httpx.post(
        f"{gateway.url}/v1/messages",
        params=KNOWN,
        json={**MESSAGE, "stream": True},
        headers={"x-api-key": token},
        timeout=10,
    )
    assert response.status_code == 200
    assert response.text.count("event: message_delta") == 1
    client.messages.count_tokens(model="claude-test", messages=MESSAGE["messages"])
    # Someone else's usage is not shown to alice.
    anthropic.Anthropic(base_url=gateway.url, api_key=other, max_retries=0).messages.create(
        **MESSAGE, extra_query=KNOWN
    )

    body = wait_for_totals(gateway, token, lambda totals: totals["requests"] >= 6)
    assert body["totals"] == {
        "requests": 6,
        "rejected": 0,
        "input_tokens": 500,
        "output_tokens": 20,
        "cache_creation_input_tokens": 35,
        "cache_read_input_tokens": 55,
    }
    rows = by_model(body)
    assert rows["claude-test"]["requests"] == 5
    assert rows[""] == {
        "model": "",
        "requests": 1,  # count_tokens
        "rejected": 0,
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    day = usage(gateway, token).json()  # the default: the last 7 days, by day
    assert len(day["rows"]) == 1
    assert day["totals"] == body["totals"]
    hour = usage(gateway, token, group_by="hour").json()
    assert sum(row["output_tokens"] for row in hour["rows"]) == 20
    assert all(row["hour"].endswith(":00:00Z") for row in hour["rows"])

    # The operator's view: everyone, by user.
    out = gateway.cli("usage", "--by", "user", "--json").stdout.splitlines()
    rows_by_user = {row["user"]: row for row in map(json.loads, out[:-1])}
    assert rows_by_user["alice"]["input_tokens"] == 500
    assert rows_by_user["bob"]["requests"] == 1
    assert rows_by_user["bob"]["output_tokens"] == 4
    assert json.loads(out[-1])["totals"]["requests"] == 7
    table = gateway.cli("usage", "--user", "alice", "--by", "model").stdout
    assert "claude-test" in table
    assert "500" in table


def test_a_stream_the_client_leaves_counts_what_was_relayed(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(**FAST_FLUSH)
    token, _ = gateway.user_with_key("alice")
    # message_start (input 50, cache read 3, output 1) goes out at once; the stream would
    # then run for minutes: the client leaves after its first bytes.
    with held_streams(gateway, token, 1, f"{HOLD_QUERY}&input_tokens=50&cache_read=3"):
        pass
    body = wait_for_totals(gateway, token, lambda totals: totals["requests"] >= 1)
    assert body["totals"] == {
        "requests": 1,
        "rejected": 0,
        "input_tokens": 50,
        "output_tokens": 1,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 3,
    }
    assert by_model(body)["claude-test"]["input_tokens"] == 50


def test_an_upstream_cut_counts_what_was_relayed(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(**FAST_FLUSH)
    token, _ = gateway.user_with_key("alice")
    # cut_after=5: message_start, block start, ping, two deltas; no message_delta.
    response = httpx.post(
        f"{gateway.url}/v1/messages",
        params={**KNOWN, "cut_after": "5"},
        json={**MESSAGE, "stream": True},
        headers={"x-api-key": token},
        timeout=10,
    )
    assert "event: error" in response.text
    body = wait_for_totals(gateway, token, lambda totals: totals["requests"] >= 1)
    assert body["totals"]["input_tokens"] == 100
    assert body["totals"]["output_tokens"] == 1  # message_start's; the delta never came
    assert body["totals"]["cache_read_input_tokens"] == 11


def test_rejections_are_counted_with_no_model(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(**FAST_FLUSH)
    token, _ = gateway.user_with_key("alice", cap=1)
    with held_streams(gateway, token, 1):
        for _ in range(3):
            refused = httpx.post(
                f"{gateway.url}/v1/messages",
                json=MESSAGE,
                headers={"x-api-key": token},
                timeout=10,
            )
            assert refused.status_code == 429
    body = wait_for_totals(
        gateway, token, lambda totals: totals["rejected"] >= 3 and totals["requests"] >= 1
    )
    assert body["totals"]["rejected"] == 3
    assert by_model(body)[""]["rejected"] == 3
    assert by_model(body)[""]["requests"] == 0
    assert by_model(body)["claude-test"]["requests"] == 1


def test_two_workers_flushes_add_up(start_gateway: Callable[..., GatewayProcess]) -> None:
    gateway = start_gateway(workers=2, **FAST_FLUSH)
    token, _ = gateway.user_with_key("alice")
    with httpx.Client(timeout=10) as client:
        for _ in range(30):
            # A new connection each time: Granian spreads connections over its workers.
            response = client.post(
                f"{gateway.url}/v1/messages",
                params=KNOWN,
                json=MESSAGE,
                headers={"x-api-key": token, "connection": "close"},
            )
            assert response.status_code == 200
    body = wait_for_totals(gateway, token, lambda totals: totals["requests"] >= 30)
    assert body["totals"]["requests"] == 30
    assert body["totals"]["input_tokens"] == 3000
    assert body["totals"]["output_tokens"] == 120
    # Every flush of every worker landed in the same (user, hour, model) row.
    assert len(usage(gateway, token, group_by="hour").json()["rows"]) <= 2  # an hour boundary


def test_a_graceful_stop_writes_what_is_left(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    # The timer would never fire during this test: only the shutdown flush writes.
    gateway = start_gateway(GATEWAY_USAGE_FLUSH_INTERVAL="3600")
    token, _ = gateway.user_with_key("alice")
    for _ in range(3):
        response = httpx.post(
            f"{gateway.url}/v1/messages",
            params=KNOWN,
            json=MESSAGE,
            headers={"x-api-key": token},
            timeout=10,
        )
        assert response.status_code == 200
    assert usage(gateway, token).json()["totals"]["requests"] == 0
    assert gateway.stop() == 0
    out = gateway.cli("usage", "--json").stdout.splitlines()
    assert json.loads(out[-1])["totals"]["requests"] == 3
    assert json.loads(out[-1])["totals"]["input_tokens"] == 300


def test_bad_parameters_get_a_400_naming_them(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway()
    token = gateway.create_user("alice")
    for params, named in (
        ({"group_by": "week"}, "group_by"),
        ({"from": "yesterday"}, "from"),
        ({"to": "2026-13-01"}, "to"),
        ({"from": "2026-11-02", "to": "2026-11-01"}, "from"),
        ({"from": "2020-01-01", "to": "2026-01-01"}, "from"),
    ):
        response = usage(gateway, token, **params)
        assert response.status_code == 400, (params, response.text)
        assert response.json()["error"]["message"].startswith(f"{named}:"), response.text
    assert usage(gateway, "gwt_nope").status_code == 401
    ok = usage(gateway, token, **{"from": "2026-11-01", "to": "2026-11-02T00:30:00Z"})
    assert ok.status_code == 200
    assert ok.json() == {
        "rows": [],
        "totals": {
            "requests": 0,
            "rejected": 0,
            "input_tokens": 0,
            "output_tokens": 0,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }
    schema = httpx.get(f"{gateway.url}/schema/openapi.json", timeout=10).json()
    operation = schema["paths"][USAGE_PATH]["get"]
    assert {p["name"] for p in operation["parameters"]} == {"from", "to", "group_by"}
    bad = gateway.cli("usage", "--since", "last week", check=False)
    assert bad.returncode != 0
    assert "since" in bad.stderr


@contextmanager
def database_outage(database_url: str) -> Iterator[None]:
    """The database refuses the gateway's writes until the block ends.

    SQLite: another process holds its write lock (every write waits out the busy timeout,
    then fails). Postgres: the database stops taking connections and its open ones are
    ended (the pool's reconnects fail), as a restart looks from the gateway's side.
    """
    if database_url.startswith("sqlite:///"):
        holder = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            yield
        finally:
            holder.close()  # rolls back and lets go
        return
    name = urlsplit(database_url).path.lstrip("/")
    server = urlsplit(database_url)._replace(path="/postgres").geturl()
    _run_in_thread(_admin(server, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
    try:
        _run_in_thread(
            _admin(
                server,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{name}' AND pid <> pg_backend_pid()",
            )
        )
        yield
    finally:
        _run_in_thread(_admin(server, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))


def test_flushes_while_the_database_is_down_are_retried_and_nothing_is_lost(
    start_gateway: Callable[..., GatewayProcess], gateway_database_url: str
) -> None:
    gateway = start_gateway(workers=1, **FAST_FLUSH)
    token, _ = gateway.user_with_key("alice")

    def post() -> None:
        response = httpx.post(
            f"{gateway.url}/v1/messages",
            params=KNOWN,
            json=MESSAGE,
            headers={"x-api-key": token},
            timeout=30,
        )
        assert response.status_code == 200

    post()  # the worker's credential cache is warm: requests need no database
    wait_for_totals(gateway, token, lambda totals: totals["requests"] >= 1)
    with database_outage(gateway_database_url):
        for _ in range(4):
            post()
        # Long enough for several failed flushes (SQLite: each waits out its 5 s busy
        # timeout; Postgres: each fails at once, five a second).
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline and not _logged(gateway, "usage cannot be written"):
            time.sleep(0.2)
        time.sleep(6)
        for _ in range(2):
            post()
    body = wait_for_totals(gateway, token, lambda totals: totals["requests"] >= 7, timeout=30)
    assert body["totals"]["requests"] == 7
    assert body["totals"]["input_tokens"] == 700
    assert body["totals"]["output_tokens"] == 28
    assert body["totals"]["cache_read_input_tokens"] == 77
    # Once per outage, not once per flush; and once when it is over.
    assert _logged(gateway, "usage cannot be written") == 1
    assert _logged(gateway, "usage written again after an outage") == 1


def _logged(gateway: GatewayProcess, start: str) -> int:
    return sum(
        1 for record in gateway.log_records() if str(record.get("msg", "")).startswith(start)
    )


def test_tokens_are_exported_to_prometheus_by_user_model_and_kind(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(workers=2)
    token, _ = gateway.user_with_key("alice")
    for stream in (False, True, False):
        response = httpx.post(
            f"{gateway.url}/v1/messages",
            params=KNOWN,
            json={**MESSAGE, "stream": stream},
            headers={"x-api-key": token},
            timeout=10,
        )
        assert response.status_code == 200
    expected = {
        "input": 300.0,
        "output": 12.0,
        "cache_creation_input": 21.0,
        "cache_read_input": 33.0,
    }
    deadline = time.monotonic() + 20
    while True:
        assert gateway.metrics_url is not None
        text = httpx.get(gateway.metrics_url, timeout=10).text
        found = {
            sample.labels["kind"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "gateway_tokens_total"
            and sample.labels.get("user") == "alice"
            and sample.labels.get("model") == "claude-test"
        }
        if found == expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert found == expected


def test_usage_off_counts_nothing(start_gateway: Callable[..., GatewayProcess]) -> None:
    gateway = start_gateway(GATEWAY_USAGE_FLUSH_INTERVAL="0")
    token, _ = gateway.user_with_key("alice")
    response = httpx.post(
        f"{gateway.url}/v1/messages",
        params=KNOWN,
        json={**MESSAGE, "stream": True},
        headers={"x-api-key": token},
        timeout=10,
    )
    assert response.status_code == 200
    assert "event: message_delta" in response.text  # relayed all the same
    assert gateway.stop() == 0  # no shutdown flush either
    out = gateway.cli("usage", "--json").stdout.splitlines()
    assert json.loads(out[-1])["totals"]["requests"] == 0
