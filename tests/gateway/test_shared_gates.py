"""Caps shared by several hosts through Redis (GATEWAY_GATES_URL=redis://...).

Two `gateway serve` instances (separate ports and IPC namespaces, one SQLite database, one
Redis prefix), two workers each, stand in for two hosts. The fake upstream's own in-flight
counts per key are the ground truth.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager
from pathlib import Path

import httpx
import pytest

from loadtests.fake_upstream import FakeUpstream
from loadtests.procs import children
from tests.fixtures.gateway import ROOT, GatewayProcess, base_env, fresh_namespace, launch
from tests.fixtures.redis import ThrowawayRedis, mark_ready
from tests.gateway.test_caps import HOLD, STREAM, first_chunk, one_request, wait_for

pytestmark = pytest.mark.slow

COORDINATION = "The gateway's coordination store is unavailable; retry shortly."
Hosts = Callable[..., list[GatewayProcess]]


@pytest.fixture
def hosts(
    tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str, redis_prefix: str
) -> Iterator[Hosts]:
    """Start ``count`` gateways over one database and one Redis prefix; all stopped after."""
    with ExitStack() as stack:
        database_url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
        master_key = None
        started = 0

        def start(
            count: int = 2, *, gates_url: str = redis_url, **extra: str
        ) -> list[GatewayProcess]:
            nonlocal master_key, started
            out = []
            for _ in range(count):
                namespace = stack.enter_context(fresh_namespace())
                env = base_env(
                    tmp_path / "data",
                    database_url=database_url,
                    namespace=namespace,
                    upstream_url=fake_upstream.url,
                )
                master_key = master_key or env["GATEWAY_MASTER_KEY"]
                env.update(
                    GATEWAY_MASTER_KEY=master_key,  # one deployment: one master key
                    GATEWAY_GATES_URL=gates_url,
                    GATEWAY_GATES_PREFIX=redis_prefix,
                    GATEWAY_LEASE_SECONDS="3",
                    **extra,
                )
                log_dir = tmp_path / f"host-{started}"
                log_dir.mkdir()
                started += 1
                gateway = launch(env, workers=2, log_dir=log_dir)
                stack.callback(gateway.stop)
                out.append(gateway)
            return out

        yield start


@asynccontextmanager
async def streams(
    targets: list[tuple[GatewayProcess, str]], query: str = HOLD
) -> AsyncIterator[list[int]]:
    """One SSE stream per (gateway, token), all started at once, each on its own
    connection; the statuses, and the admitted ones stay open until the block ends."""
    async with AsyncExitStack() as stack:

        async def start(gateway: GatewayProcess, token: str) -> int:
            client = await stack.enter_async_context(httpx.AsyncClient(timeout=30))
            response = await stack.enter_async_context(
                client.stream(
                    "POST",
                    f"{gateway.url}/v1/messages{query}",
                    json=STREAM,
                    headers={"x-api-key": token},
                )
            )
            if response.status_code == 200:
                await first_chunk(response)
            else:
                await response.aread()
            return response.status_code

        yield list(await asyncio.gather(*(start(g, t) for g, t in targets)))


def key_stats(fake: FakeUpstream, key: str) -> dict[str, int]:
    return dict(fake.stats()["keys"].get(key, {"in_flight": 0, "max_in_flight": 0}))


async def test_one_cap_across_two_hosts(hosts: Hosts, fake_upstream: FakeUpstream) -> None:
    a, b = hosts(2)
    token, key = a.user_with_key("alice", cap=3)
    admitted_by: set[str] = set()
    for _round in range(8):
        targets = [(a if i % 2 else b, token) for i in range(8)]
        async with streams(targets) as statuses:
            assert sorted(statuses) == [200] * 3 + [429] * 5
            assert key_stats(fake_upstream, key)["in_flight"] == 3
            mine = httpx.get(
                f"{b.url}/api/v1/me/anthropic-key",
                headers={"authorization": f"Bearer {token}"},
                timeout=10,
            ).json()
            assert (mine["max_concurrent"], mine["in_use"]) == (3, 3)  # both hosts' streams
            admitted_by |= {("a" if i % 2 else "b") for i, s in enumerate(statuses) if s == 200}
        await wait_for(lambda: key_stats(fake_upstream, key)["in_flight"] == 0, 5, "streams to end")
        if _round >= 2 and admitted_by == {"a", "b"}:
            break
    assert admitted_by == {"a", "b"}, "one host never admitted: the test proved nothing"
    assert key_stats(fake_upstream, key)["max_in_flight"] == 3
    rows = {row["scope"]: row for row in b.caps()}
    assert rows["credential"]["cap"] == 3 and rows["credential"]["in_use"] == 0


async def test_global_cap_across_two_hosts(hosts: Hosts, fake_upstream: FakeUpstream) -> None:
    a, b = hosts(2, PROXY_MAX_GLOBAL_CONCURRENT="4")
    alice, _ = a.user_with_key("alice", cap=4)
    bob, _ = a.user_with_key("bob", cap=4)
    async with streams([(a, alice), (b, alice), (a, bob), (b, bob)]) as statuses:
        assert statuses == [200] * 4
        for host, token in ((a, alice), (b, bob), (b, alice)):
            refused = await one_request(host, token)
            assert refused.status_code == 429
            assert refused.headers["x-gateway-overloaded-scope"] == "global"
            assert refused.json()["error"]["message"] == "Server is at capacity. Retry shortly."
        rows = [row for row in a.caps() if row["scope"] == "global"]
        assert [(r["cap"], r["in_use"]) for r in rows] == [(4, 4)]
    assert (await one_request(b, bob)).status_code == 200


async def test_a_cap_change_on_one_host_binds_the_other_at_once(hosts: Hosts) -> None:
    a, b = hosts(2)
    token, _ = a.user_with_key("carol", cap=3)
    for _ in range(6):  # both of b's workers cache the credential at cap 3
        assert (await one_request(b, token)).status_code == 200
    async with streams([(b, token), (b, token)]) as statuses:
        assert statuses == [200, 200]
        assert a.put_key(token, cap=1).status_code == 204  # through host a's settings API
        for _ in range(6):  # every worker of b: 2 in flight, over the new cap of 1
            refused = await one_request(b, token)
            assert refused.status_code == 429
            assert "(cap: 1)" in refused.json()["error"]["message"]
    async with streams([(b, token)]) as statuses:
        assert statuses == [200]
        assert (await one_request(b, token)).status_code == 429
    a.cli("users", "set-cap", "carol", "2")  # and through host a's command line
    async with streams([(b, token), (b, token)]) as statuses:
        assert statuses == [200, 200]
        assert (await one_request(b, token)).status_code == 429


async def test_a_token_revoked_on_one_host_is_refused_by_the_other_at_once(
    hosts: Hosts,
) -> None:
    a, b = hosts(2)
    token, _ = a.user_with_key("dave", cap=4)
    for _ in range(6):  # cached by both of b's workers
        assert (await one_request(b, token)).status_code == 200
    listing = a.cli("tokens", "list", "dave", "--json").stdout.splitlines()
    a.cli("tokens", "revoke", str(json.loads(listing[0])["id"]))
    for _ in range(6):
        refused = await one_request(b, token)
        assert refused.status_code == 401
        assert refused.json()["error"]["type"] == "authentication_error"


async def test_a_host_killed_whole_gives_its_slots_back_within_a_lease(
    hosts: Hosts, fake_upstream: FakeUpstream
) -> None:
    a, b = hosts(2)
    cap = 4
    token, key = a.user_with_key("erin", cap=cap)
    async with AsyncExitStack() as stack:
        statuses = await stack.enter_async_context(streams([(a, token)] * 3))
        assert statuses == [200] * 3
        # The whole host at once: launcher, Granian server and workers, no goodbyes.
        for pid in children(a.pid):
            os.killpg(pid, signal.SIGKILL)  # Granian leads its own session, with its workers
        os.kill(a.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        # b gets the dead host's slots once its leases expire, not before.
        held = 0
        while held < cap:
            status = (await stack.enter_async_context(streams([(b, token)])))[0]
            if status == 200:
                held += 1
            else:
                assert status == 429
                assert time.monotonic() - killed_at < 3 + 1, "slots not back within a lease"
                await asyncio.sleep(0.1)
        assert key_stats(fake_upstream, key)["max_in_flight"] <= cap
        assert (await one_request(b, token)).status_code == 429


async def full_stream(gateway: GatewayProcess, token: str, query: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as client:
        return await client.post(
            f"{gateway.url}/v1/messages{query}", json=STREAM, headers={"x-api-key": token}
        )


async def test_redis_down_fails_closed_and_nothing_goes_over_a_cap_after_it_returns(
    hosts: Hosts, fake_upstream: FakeUpstream, throwaway_redis: ThrowawayRedis, redis_prefix: str
) -> None:
    mark_ready(throwaway_redis.client(), redis_prefix)
    (a,) = hosts(1, gates_url=throwaway_redis.url)
    cap = 2
    token, key = a.user_with_key("fay", cap=cap)
    async with AsyncExitStack() as stack:
        # One long stream (about 20 s: it outlives the outage and the recovery) and one
        # short one (about 3 s), both in flight when Redis goes.
        assert await stack.enter_async_context(streams([(a, token)], "?events=200&delay=0.1")) == [
            200
        ]
        short = asyncio.create_task(full_stream(a, token, "?events=30&delay=0.1"))
        await wait_for(lambda: key_stats(fake_upstream, key)["in_flight"] == 2, 5, "both")

        throwaway_redis.stop()  # gone, with its data
        for _ in range(10):
            refused = await one_request(a, token)
            assert refused.status_code == 503
            assert refused.json() == {
                "type": "error",
                "error": {"type": "api_error", "message": COORDINATION},
            }
            assert refused.headers["retry-after"].isdigit()
        health = httpx.get(f"{a.url}/healthz", timeout=10)  # the load balancer's view
        assert health.status_code == 503 and "coordination" in health.text
        finished = await short  # a stream in flight finishes during the outage
        assert finished.status_code == 200
        assert finished.text.rstrip().endswith('{"type":"message_stop"}')
        lines = [r for r in a.log_records() if "is unreachable" in r.get("msg", "")]
        assert 1 <= len(lines) <= a.workers  # one per worker per outage, not per request

        # Back, empty: the long stream's lease went with the data. It must count again
        # before anything is admitted: one more stream fits under the cap, not two.
        throwaway_redis.start()
        admitted = 0
        deadline = time.monotonic() + 8  # past the recovery (one lease time, 3 s)
        while time.monotonic() < deadline:
            (status,) = await stack.enter_async_context(
                streams([(a, token)], "?events=200&delay=0.1")
            )
            assert status in (200, 429, 503)
            admitted += status == 200
            await asyncio.sleep(0.2)
        assert admitted == cap - 1
        assert key_stats(fake_upstream, key)["max_in_flight"] <= cap
    assert "answers again" in a.logs()
    assert httpx.get(f"{a.url}/healthz", timeout=10).status_code == 200


async def test_the_wait_for_a_slot_spans_hosts(hosts: Hosts, fake_upstream: FakeUpstream) -> None:
    """GATEWAY_QUEUE_TIMEOUT with Redis gates: a request over the cap on one host waits
    for a slot freed on the other, and one whose time is up gets the 429."""
    a, b = hosts(2, GATEWAY_QUEUE_TIMEOUT="8")
    token, key = a.user_with_key("gus", cap=2)
    one_second = "?events=10&delay=0.1"
    responses = await asyncio.gather(
        *(full_stream(host, token, one_second) for host in (a, b, a, b, a, b))
    )
    assert [r.status_code for r in responses] == [200] * 6
    assert all(r.text.rstrip().endswith('{"type":"message_stop"}') for r in responses)
    assert key_stats(fake_upstream, key)["max_in_flight"] == 2
    waited = [
        r.get("waited_ms", 0)
        for host in (a, b)
        for r in host.log_records()
        if r.get("logger") == "gateway.access"
    ]
    assert sum(1 for ms in waited if ms > 500) >= 2, waited
    (c,) = hosts(1, GATEWAY_QUEUE_TIMEOUT="0.5")
    async with streams([(a, token), (b, token)]) as statuses:
        assert statuses == [200, 200]
        started = time.monotonic()
        late = await full_stream(c, token, "")
        assert late.status_code == 429
        assert late.json()["error"]["message"].endswith("(waited 0.5 s)")
        assert 0.5 <= time.monotonic() - started < 5


async def test_metrics_and_caps_watch_show_every_hosts_leases(
    hosts: Hosts, fake_upstream: FakeUpstream
) -> None:
    """With Redis gates there is no semaphore to read: each host's /metrics and
    ``caps --watch`` read the leases of every host from Redis."""
    from tests.gateway.test_metrics import scrape, value

    a, b = hosts(2, PROXY_MAX_GLOBAL_CONCURRENT="10")
    token, _key = a.user_with_key("alice", cap=3)
    async with streams([(a, token), (b, token), (b, token), (a, token)]) as statuses:
        assert sorted(statuses) == [200, 200, 200, 429]
        for gateway in (a, b):
            samples = scrape(gateway)
            assert value(samples, "gateway_credential_in_flight", user="alice") == 3
            assert value(samples, "gateway_credential_cap", user="alice") == 3
            assert value(samples, "gateway_in_flight", scope="global") == 3
            assert value(samples, "gateway_global_cap") == 10
        watch = subprocess.Popen(
            [sys.executable, "-m", "gateway", "caps", "--watch", "--json", "--interval", "0.2"],
            env=b.env, cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert watch.stdout is not None
            seen = [json.loads(watch.stdout.readline()) for _ in range(4)]  # two refreshes
        finally:
            watch.send_signal(signal.SIGINT)
            watch.wait(10)
    assert watch.returncode == 0
    rows = {(row["scope"], row["user"]): row for row in seen}
    assert rows[("credential", "alice")]["in_use"] == 3
    assert rows[("credential", "alice")]["cap"] == 3
    assert rows[("global", None)]["in_use"] == 3
    assert rows[("global", None)]["cap"] == 10
