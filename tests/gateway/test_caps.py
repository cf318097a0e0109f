"""Concurrency caps across Granian workers: exact, and never leaking a permit.

Each test runs its own `gateway serve` with two workers against the fake upstream, whose
own in-flight counts are the ground truth.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from ipc.ledger import read_ledger
from ipc.namespace import usage
from ipc.naming import POSIX_NAME_MAX, list_ledgers, list_semaphores
from loadtests.fake_upstream import FakeUpstream
from loadtests.procs import children
from tests.fixtures.gateway import GatewayProcess, shm_leftovers
from tests.fixtures.redis import live_leases

pytestmark = pytest.mark.slow

STREAM = {"model": "claude-test", "max_tokens": 16, "stream": True, "messages": []}
HOLD = "?events=2000&delay=0.1"  # a stream that stays open until we leave


def gates(gateway: GatewayProcess) -> dict[str, Any]:
    rows = usage(gateway.namespace)
    return {
        "global": next((r for r in rows if r.scope == "global"), None),
        "credential": {r.user_id: r for r in rows if r.scope == "credential"},
    }


def held_per_worker(gateway: GatewayProcess) -> dict[int, int]:
    """Permits held per worker pid, from the workers' own ledgers."""
    out: dict[int, int] = {}
    for name in list_ledgers(gateway.namespace):
        snapshot = read_ledger(name)
        if snapshot is not None:
            held = sum(h.count for h in snapshot.holdings if ".c." in h.name)
            if held:
                out[snapshot.pid] = held
    return out


async def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


_open_iterators: list[AsyncIterator[bytes]] = []


async def first_chunk(response: httpx.Response) -> bytes:
    """Read the first chunk and keep the iterator alive: a collected ``aiter_raw``
    generator closes its response, which would look like a client disconnect."""
    iterator = response.aiter_raw()
    _open_iterators.append(iterator)
    return await iterator.__anext__()


@asynccontextmanager
async def held_streams(
    gateway: GatewayProcess, token: str, count: int, query: str = HOLD
) -> AsyncIterator[list[httpx.Response]]:
    """``count`` SSE streams, each on its own connection, open until the block ends."""
    async with AsyncExitStack() as stack:
        responses = []
        for _ in range(count):
            client = await stack.enter_async_context(httpx.AsyncClient(timeout=30))
            response = await stack.enter_async_context(
                client.stream(
                    "POST",
                    f"{gateway.url}/v1/messages{query}",
                    json=STREAM,
                    headers={"x-api-key": token},
                )
            )
            assert response.status_code == 200, await response.aread()
            await first_chunk(response)  # admitted and streaming
            responses.append(response)
        yield responses


async def one_request(gateway: GatewayProcess, token: str, query: str = "") -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(
            f"{gateway.url}/v1/messages{query}",
            json={**STREAM, "stream": False},
            headers={"x-api-key": token},
        )


def user_id_of(gateway: GatewayProcess, token: str) -> str:
    listing = gateway.cli("users", "list", "--json").stdout.splitlines()
    # the newest user is the last line
    return str(json.loads(listing[-1])["id"])


async def burst(
    stack: AsyncExitStack, gateway: GatewayProcess, token: str, count: int
) -> list[httpx.Response]:
    """``count`` streams started at once, each on its own connection; open ones stay open."""

    async def start() -> httpx.Response:
        client = await stack.enter_async_context(httpx.AsyncClient(timeout=30))
        response = await stack.enter_async_context(
            client.stream(
                "POST",
                f"{gateway.url}/v1/messages{HOLD}",
                json=STREAM,
                headers={"x-api-key": token},
            )
        )
        if response.status_code == 200:
            await first_chunk(response)
        else:
            await response.aread()
        return response

    return list(await asyncio.gather(*(start() for _ in range(count))))


def worker_pids_in_log(gateway: GatewayProcess) -> set[int]:
    entries = gateway.log_records()
    return {e["pid"] for e in entries if e.get("logger") == "gateway.access"}


async def test_per_credential_cap_is_exact_across_workers(
    start_gateway: Callable[..., GatewayProcess], fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(workers=2)
    cap = 4
    token, key = gateway.user_with_key("alice", cap=cap)
    spread_seen = False
    for _attempt in range(6):
        async with AsyncExitStack() as stack:
            responses = await burst(stack, gateway, token, 3 * cap)
            statuses = sorted(r.status_code for r in responses)
            assert statuses == [200] * cap + [429] * (2 * cap)
            spread = held_per_worker(gateway)
            assert sum(spread.values()) == cap
            row = next(iter(gates(gateway)["credential"].values()))
            assert (row.cap, row.in_use, row.free) == (cap, cap, 0)
            rejected = next(r for r in responses if r.status_code == 429)
            assert json.loads(await rejected.aread()) == {
                "type": "error",
                "error": {
                    "type": "overloaded_error",
                    "message": (
                        f"Too many concurrent requests against this credential (cap: {cap}). "
                        "Retry shortly."
                    ),
                },
            }
            assert rejected.headers["retry-after"].isdigit()
            assert rejected.headers["x-should-retry"] == "true"
            assert rejected.headers["x-gateway-overloaded-scope"] == "credential"
        await wait_for(lambda: held_per_worker(gateway) == {}, 3, "permits back")
        if len(worker_pids_in_log(gateway)) >= 2:
            spread_seen = True
            break
    assert spread_seen, "requests never reached both workers"
    # The upstream's own count: never more than the cap in flight for this key.
    assert fake_upstream.stats()["keys"][key]["max_in_flight"] == cap
    assert (await one_request(gateway, token)).status_code == 200
    logged = gateway.log_records()
    warning = next(e for e in logged if e.get("reason") == "per_credential_cap")
    assert warning["cap_value"] == cap
    assert warning["path"] == "/v1/messages"
    assert warning["level"] == "warning"
    assert warning["user_id"] == user_id_of(gateway, token)


async def test_global_cap_spans_users(
    start_gateway: Callable[..., GatewayProcess], fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(workers=2, PROXY_MAX_GLOBAL_CONCURRENT="3")
    token_a, key_a = gateway.user_with_key("alice", cap=2)
    token_b, key_b = gateway.user_with_key("bob", cap=2)
    async with held_streams(gateway, token_a, 2), held_streams(gateway, token_b, 1):
        rejected = await one_request(gateway, token_b)
        assert rejected.status_code == 429
        assert rejected.json()["error"] == {
            "type": "overloaded_error",
            "message": "Server is at capacity. Retry shortly.",
        }
        assert rejected.headers["x-gateway-overloaded-scope"] == "global"
        state = gates(gateway)
        assert (state["global"].in_use, state["global"].free) == (3, 0)
        # bob's own gate gave its permit back at once: 1 held, 1 free
        bob = [r for r in state["credential"].values() if r.in_use == 1]
        assert len(bob) == 1 and bob[0].free == 1
    stats = fake_upstream.stats()["keys"]
    assert stats[key_a]["max_in_flight"] <= 2 and stats[key_b]["max_in_flight"] <= 1
    await wait_for(lambda: gates(gateway)["global"].free == 3, 3, "global permits back")
    assert (await one_request(gateway, token_b)).status_code == 200


@pytest.fixture(params=["posix", "redis"])
def gates_backend(request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment that picks a gate backend: POSIX semaphores, or Redis leases (the
    default lease time: a leaked lease would stay for 15 s, far past the checks below)."""
    if request.param == "posix":
        return {}
    return {
        "GATEWAY_GATES_URL": request.getfixturevalue("redis_url"),
        "GATEWAY_GATES_PREFIX": request.getfixturevalue("redis_prefix"),
    }


def slots_free(gateway: GatewayProcess, global_cap: int) -> bool:
    """Every gate back to its cap, on either backend; no permit held by any worker."""
    prefix = gateway.env.get("GATEWAY_GATES_PREFIX")
    if "GATEWAY_GATES_URL" in gateway.env and prefix is not None:
        return live_leases(prefix) == {}
    state = gates(gateway)
    return (
        state["global"].free == global_cap
        and all(r.free == r.cap for r in state["credential"].values())
        and held_per_worker(gateway) == {}
    )


def global_in_use(gateway: GatewayProcess) -> int:
    prefix = gateway.env.get("GATEWAY_GATES_PREFIX")
    if "GATEWAY_GATES_URL" in gateway.env and prefix is not None:
        return live_leases(prefix).get(f"{prefix}g", 0)
    return int(gates(gateway)["global"].in_use)


@pytest.mark.parametrize(
    "how",
    ["complete", "disconnect", "error_status", "cut", "timeout", "unreachable"],
)
async def test_permit_comes_back(
    start_gateway: Callable[..., GatewayProcess],
    fake_upstream: FakeUpstream,
    gates_backend: dict[str, str],
    how: str,
) -> None:
    extra = {"PROXY_MAX_GLOBAL_CONCURRENT": "5", "GATEWAY_UPSTREAM_READ_TIMEOUT": "1"}
    extra.update(gates_backend)
    if how == "unreachable":
        extra["GATEWAY_UPSTREAM_URL"] = "http://127.0.0.1:9"  # discard port: refused
    gateway = start_gateway(workers=2, **extra)
    token, _ = gateway.user_with_key("carol", cap=1)

    if how == "complete":
        assert (await one_request(gateway, token, "?delay=0.2")).status_code == 200
    elif how == "disconnect":
        async with held_streams(gateway, token, 1):
            assert global_in_use(gateway) == 1
    elif how == "error_status":
        assert (await one_request(gateway, token, "?status=500")).status_code == 500
    elif how == "cut":
        with pytest.raises(httpx.RemoteProtocolError):  # the body is seen to be incomplete
            await one_request(gateway, token, "?cut_after=1")
    elif how == "timeout":
        response = await one_request(gateway, token, "?stall_before_headers=5")
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "api_error"
        async with httpx.AsyncClient(timeout=30) as client:
            streamed = await client.post(
                f"{gateway.url}/v1/messages?stall=5",
                json=STREAM,
                headers={"x-api-key": token},
            )
        assert streamed.status_code == 200
        assert "event: error" in streamed.text
    elif how == "unreachable":
        response = await one_request(gateway, token)
        assert response.status_code == 502
        assert response.json()["error"]["type"] == "api_error"

    await wait_for(lambda: slots_free(gateway, 5), 3, "every permit back")
    if how != "unreachable":
        # cap 1: only admitted if the permit really came back
        assert (await one_request(gateway, token)).status_code == 200


async def test_a_client_that_saw_its_response_end_is_admitted_at_once(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    """Cap 1, back to back, several users at once: the slot is free before the client
    sees the end of its body, so a sequential client is never refused by its own
    finished request (keep-alive or a fresh connection, streaming or not)."""
    users, rounds = 6, 40
    gateway = start_gateway(workers=2, PROXY_MAX_GLOBAL_CONCURRENT=str(users))
    tokens = {}
    for i in range(users):
        token, _ = gateway.user_with_key(f"carla{i}", cap=1)
        tokens[user_id_of(gateway, token)] = token

    async def sequential(user_id: str, token: str) -> list[tuple[int, int]]:
        seen = []
        async with httpx.AsyncClient(timeout=30) as kept_alive:
            for round_ in range(rounds):
                body = {**STREAM, "stream": round_ % 2 == 0}
                fresh = round_ % 4 >= 2
                client = httpx.AsyncClient(timeout=30) if fresh else kept_alive
                response = await client.post(
                    f"{gateway.url}/v1/messages", json=body, headers={"x-api-key": token}
                )
                if fresh:
                    await client.aclose()
                # the gateway's own semaphore agrees with what the client saw, at once
                seen.append((response.status_code, gates(gateway)["credential"][user_id].free))
        return seen

    results = await asyncio.gather(*(sequential(u, t) for u, t in tokens.items()))
    assert results == [[(200, 1)] * rounds] * users
    assert gates(gateway)["global"].free == users


async def test_cap_change_reaches_every_worker_at_once(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(workers=2)
    token, _ = gateway.user_with_key("dave", cap=3)
    for _ in range(6):  # both workers cache the credential at cap 3
        assert (await one_request(gateway, token)).status_code == 200
    async with held_streams(gateway, token, 2):
        assert gateway.put_key(token, cap=1).status_code == 204
        # In flight: 2, over the new cap of 1. Every worker refuses at once, and keeps
        # refusing until in flight is below the cap again.
        for _ in range(6):
            rejected = await one_request(gateway, token)
            assert rejected.status_code == 429
            assert "(cap: 1)" in rejected.json()["error"]["message"]
    await wait_for(lambda: held_per_worker(gateway) == {}, 3, "permits back")
    async with held_streams(gateway, token, 1):
        assert (await one_request(gateway, token)).status_code == 429
    rows = list(gates(gateway)["credential"].values())
    assert [(r.cap, r.free) for r in rows] == [(1, 1)]

    # DELETE, then PUT with a new key: works, at the default cap of 8.
    headers = {"authorization": f"Bearer {token}"}
    deleted = httpx.delete(f"{gateway.url}/api/v1/me/anthropic-key", headers=headers)
    assert deleted.status_code == 204
    for _ in range(4):
        assert (await one_request(gateway, token)).status_code == 401
    assert gateway.put_key(token, key="sk-ant-test-rotated").status_code == 204
    async with held_streams(gateway, token, 8):
        assert (await one_request(gateway, token)).status_code == 429
    assert [r.cap for r in gates(gateway)["credential"].values()] == [8]


async def test_sigkill_of_a_worker_gives_its_permits_back(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(workers=2, PROXY_MAX_GLOBAL_CONCURRENT="20")
    cap = 8
    token, _ = gateway.user_with_key("erin", cap=cap)
    async with held_streams(gateway, token, 6):
        spread = held_per_worker(gateway)
        victim, victim_holds = max(spread.items(), key=lambda item: item[1])
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()

        def exact() -> bool:
            live = held_per_worker(gateway)
            if victim in live:
                return False
            held = sum(live.values())
            state = gates(gateway)
            credential = next(iter(state["credential"].values()))
            return credential.free == cap - held and state["global"].free == 20 - held

        await wait_for(exact, 2.0, "the dead worker's permits to come back")
        assert time.monotonic() - killed_at < 2.0
        assert victim_holds > 0
    # A respawned worker serves: with the survivor's streams closed, requests succeed
    # and both workers (new pids included) answer.
    await wait_for(lambda: held_per_worker(gateway) == {}, 3, "all permits back")
    for _ in range(10):
        assert (await one_request(gateway, token)).status_code == 200
    state = gates(gateway)
    assert state["global"].free == 20
    assert next(iter(state["credential"].values())).free == cap


def test_restart_starts_clean_and_second_launcher_is_refused(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    first = start_gateway(workers=2, PROXY_MAX_GLOBAL_CONCURRENT="7")
    token, _ = first.user_with_key("frank", cap=3)
    assert (
        httpx.post(
            f"{first.url}/v1/messages", json=STREAM, headers={"x-api-key": token}
        ).status_code
        == 200
    )
    for name in list_semaphores(first.namespace) + list_ledgers(first.namespace):
        assert len(name) - 1 <= POSIX_NAME_MAX and "/" not in name[1:]

    second = start_gateway(workers=1, wait=False)
    assert second.process.wait(30) != 0
    assert "held by another gateway launcher" in second.logs()

    # Leave a stale semaphore and ledger behind as a crashed run would, then restart.
    import posix_ipc

    stale = f"/{first.namespace}.c.{uuid.uuid4().hex}.1.5"
    posix_ipc.Semaphore(stale, posix_ipc.O_CREAT, initial_value=2).close()
    assert first.stop() == 0
    assert shm_leftovers(first.namespace) == []  # shutdown removed everything it created
    posix_ipc.Semaphore(stale, posix_ipc.O_CREAT, initial_value=2).close()

    third = start_gateway(workers=2, PROXY_MAX_GLOBAL_CONCURRENT="7")
    assert stale not in list_semaphores(third.namespace)
    assert gates(third)["global"].free == 7
    assert (
        httpx.post(
            f"{third.url}/v1/messages", json=STREAM, headers={"x-api-key": token}
        ).status_code
        == 200
    )
    credential = next(iter(gates(third)["credential"].values()))
    assert (credential.cap, credential.free) == (3, 3)


def test_workers_may_hold_as_many_files_as_the_hard_limit_allows(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    """Started under a low soft limit (a service manager's 1,024, here 512), the workers
    get the hard limit: every open stream holds two descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 512:
        pytest.skip(f"the hard limit here is only {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    try:
        gateway = start_gateway(workers=2)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    expected = hard if hard != resource.RLIM_INFINITY else 1 << 20
    for pid in gateway.worker_pids():
        limits = Path(f"/proc/{pid}/limits").read_text()
        line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert line.split()[3] == str(expected)
    if expected >= 8192:
        assert "open-file limit raised from 512" in gateway.logs()


@pytest.mark.parametrize("value", ["0", "-1", "", "many"])
def test_invalid_global_cap_warns_and_runs_uncapped(
    start_gateway: Callable[..., GatewayProcess], value: str
) -> None:
    gateway = start_gateway(workers=1, PROXY_MAX_GLOBAL_CONCURRENT=value)
    token, _ = gateway.user_with_key("gina", cap=2)
    assert (
        httpx.post(
            f"{gateway.url}/v1/messages", json=STREAM, headers={"x-api-key": token}
        ).status_code
        == 200
    )
    assert gates(gateway)["global"] is None
    assert "PROXY_MAX_GLOBAL_CONCURRENT" in gateway.logs()
    assert "running without a global cap" in gateway.logs()


async def test_granian_crash_loop_keeps_namespace_and_permits(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    """Granian exits when a respawned worker dies again within ~5.5 s; the launcher keeps
    the namespace, reaps the dead workers' permits and starts Granian again."""
    from gateway.launcher import MIN_UPTIME_FOR_RESTART

    gateway = start_gateway(workers=2, PROXY_MAX_GLOBAL_CONCURRENT="10")
    token, _ = gateway.user_with_key("hank", cap=4)
    assert (await one_request(gateway, token)).status_code == 200
    granian = children(gateway.pid)
    assert len(granian) == 1
    await asyncio.sleep(MIN_UPTIME_FOR_RESTART + 0.5)  # past the launcher's misconfiguration guard

    async with held_streams(gateway, token, 3):
        victim = max(held_per_worker(gateway).items(), key=lambda item: item[1])[0]
        before = set(children(granian[0]))
        os.kill(victim, signal.SIGKILL)
        # Kill the respawned worker as soon as it appears: Granian calls that a crash loop.
        deadline = time.monotonic() + 10
        while True:
            fresh = set(children(granian[0])) - before
            alive = [pid for pid in fresh if _is_worker(pid)]
            if alive:
                os.kill(alive[0], signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "no respawned worker appeared"
            await asyncio.sleep(0.05)

    # Granian exits and the launcher starts a new one on the same namespace.
    await wait_for(
        lambda: children(gateway.pid) not in ([], granian), 20, "a new Granian server"
    )
    assert gateway.process.poll() is None
    assert "restarting it" in gateway.logs()
    gateway.wait_ready()
    await wait_for(lambda: held_per_worker(gateway) == {}, 5, "every permit back")
    state = gates(gateway)
    assert state["global"].free == 10
    assert all(r.free == r.cap for r in state["credential"].values())
    async with held_streams(gateway, token, 4):
        assert (await one_request(gateway, token)).status_code == 429


def _is_worker(pid: int) -> bool:
    try:
        return b"Z" not in open(f"/proc/{pid}/stat", "rb").read().rsplit(b")", 1)[1][:3]
    except OSError:
        return False


async def test_sigterm_of_a_worker_leaves_caps_exact(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    """A worker stopped gracefully (as Granian's lifetime and max-RSS recycling do) with
    streams in flight: its permits come back whichever way its streams end."""
    gateway = start_gateway(workers=2, PROXY_MAX_GLOBAL_CONCURRENT="20")
    cap = 6
    token, _ = gateway.user_with_key("ivy", cap=cap)
    async with held_streams(gateway, token, 4, query="?events=30&delay=0.1"):
        victim, holds = max(held_per_worker(gateway).items(), key=lambda item: item[1])
        assert holds > 0
        os.kill(victim, signal.SIGTERM)
        await wait_for(lambda: not _is_worker(victim), 15, "the worker to stop")
    await wait_for(lambda: held_per_worker(gateway) == {}, 5, "every permit back")
    state = gates(gateway)
    assert state["global"].free == 20
    assert next(iter(state["credential"].values())).free == cap
    for _ in range(6):  # the respawned worker and the other one both serve
        assert (await one_request(gateway, token)).status_code == 200
