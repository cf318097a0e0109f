"""Caps that heal themselves: the launcher's audit against a real two-worker gateway."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
import uuid
from collections.abc import Callable

import httpx
import posix_ipc
import pytest

from ipc.audit import repairs_made
from ipc.caps import read_state
from ipc.naming import credential_gate_name, global_gate_name
from loadtests.fake_upstream import FakeUpstream
from tests.fixtures.gateway import GatewayProcess
from tests.gateway.test_cap_change import Streams, max_in_flight, my_row
from tests.gateway.test_caps import STREAM, held_per_worker, wait_for
from tests.gateway.test_metrics import scrape, value

pytestmark = pytest.mark.slow

INTERVAL = 1.0
GLOBAL_CAP = 12


def repair_logs(gateway: GatewayProcess) -> list[dict[str, object]]:
    return [r for r in gateway.log_records() if r.get("msg") == "cap drift repaired"]


def user_id(gateway: GatewayProcess, name: str) -> uuid.UUID:
    return uuid.UUID(my_row(gateway, name)["user_id"])


async def test_planted_drift_is_repaired_once_and_logged(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(
        workers=2,
        GATEWAY_CAP_AUDIT_INTERVAL=str(INTERVAL),
        PROXY_MAX_GLOBAL_CONCURRENT=str(GLOBAL_CAP),
    )
    token, _ = gateway.user_with_key("drifty", cap=3)
    streams = Streams(gateway, token)
    await streams.open_many(1)  # opens the gate; one permit held throughout
    user = user_id(gateway, "drifty")
    gate = credential_gate_name(gateway.namespace, user)
    try:
        # As a worker killed between its semaphore call and its ledger write leaves it.
        sem = posix_ipc.Semaphore(gate)
        sem.acquire(0)
        planted = time.monotonic()

        def exact() -> bool:
            state = read_state(gateway.namespace, user)
            return state is not None and state.in_use == 1 and state.free == 2

        await wait_for(exact, INTERVAL + 1.0, "the lost permit to be given back")
        repaired_in = time.monotonic() - planted
        # And an over-release (a permit given back twice) is taken back.
        sem.release()
        await wait_for(exact, INTERVAL + 1.0, "the extra permit to be taken back")
        sem.close()
        await asyncio.sleep(INTERVAL * 2)  # once each: nothing more to repair
        logs = repair_logs(gateway)
        assert [(r["gate"], r["drift"]) for r in logs] == [(gate, 1), (gate, -1)], logs
        assert all(r["level"] == "warning" and r["scope"] == "credential" for r in logs)
        assert repairs_made(gateway.namespace) == {"global": 0, "credential": 2}
        assert "drift repairs since start: 2 (global 0, credential 2)" in gateway.cli("caps").stdout
        samples = scrape(gateway)
        assert value(samples, "gateway_cap_repairs_total", scope="credential") == 2
        assert value(samples, "gateway_cap_repairs_total", scope="global") == 0

        glob = posix_ipc.Semaphore(global_gate_name(gateway.namespace, GLOBAL_CAP))
        try:
            glob.acquire(0)
        finally:
            glob.close()
        await wait_for(
            lambda: repairs_made(gateway.namespace)["global"] == 1, INTERVAL + 1.0, "global"
        )
        assert repaired_in < INTERVAL + 1.0
    finally:
        await streams.close_all()
    await wait_for(lambda: held_per_worker(gateway) == {}, 5, "permits back")
    row = my_row(gateway, "drifty")
    assert (row["cap"], row["in_use"], row["free"]) == (3, 0, 3)


async def churn(
    gateway: GatewayProcess,
    tokens: dict[str, str],
    *,
    seconds: float,
    kill_every: float | None,
    seed: int,
) -> dict[str, int]:
    """Mixed traffic on every token for ``seconds``: streams read to the end, streams
    dropped early, short messages, upstream errors and cuts, cap changes through the API,
    and (with ``kill_every``) a worker SIGKILLed every so often. The statuses seen."""
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    seen: dict[str, int] = {}
    queries = ["?events=4&delay=0.05", "?status=500", "?cut_after=2", "", "?events=2&delay=0.2"]

    async def client(index: int) -> None:
        token = list(tokens.values())[index % len(tokens)]
        async with httpx.AsyncClient(timeout=30) as http:
            while time.monotonic() < deadline:
                query = rng.choice(queries)
                body = {**STREAM, "stream": rng.random() < 0.6}
                try:
                    async with http.stream(
                        "POST",
                        f"{gateway.url}/v1/messages{query}",
                        json=body,
                        headers={"x-api-key": token},
                    ) as response:
                        if rng.random() < 0.2:
                            key = f"{response.status_code} dropped"
                        else:
                            await response.aread()
                            key = str(response.status_code)
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                seen[key] = seen.get(key, 0) + 1

    async def changer() -> None:
        while time.monotonic() < deadline:
            token = rng.choice(list(tokens.values()))
            try:
                response = await asyncio.to_thread(gateway.put_key, token, cap=rng.randint(1, 5))
            except httpx.HTTPError as exc:  # the worker that took it was killed
                key = f"PUT {type(exc).__name__}"
            else:
                key = f"PUT {response.status_code}"
            seen[key] = seen.get(key, 0) + 1
            await asyncio.sleep(0.7)

    async def killer() -> None:
        assert kill_every is not None
        while time.monotonic() + kill_every < deadline:
            await asyncio.sleep(kill_every)
            workers = gateway.worker_pids()
            if workers:
                os.kill(rng.choice(workers), signal.SIGKILL)

    tasks = [client(i) for i in range(12)] + [changer()]
    if kill_every is not None:
        tasks.append(killer())
    await asyncio.gather(*tasks)
    return seen


async def assert_every_cap_exact(
    gateway: GatewayProcess, fake: FakeUpstream, tokens: dict[str, str]
) -> None:
    """At rest: each credential admits exactly its cap, the global gate exactly its value."""
    await wait_for(lambda: held_per_worker(gateway) == {}, 10, "permits back")
    await wait_for(lambda: fake.stats()["in_flight"] == 0, 10, "the upstream to be idle")
    for name, token in tokens.items():
        row = my_row(gateway, name)
        cap = row["cap"]
        assert (row["in_use"], row["free"], row["to_drain"]) == (0, cap, 0), row
        fake.reset()
        streams = Streams(gateway, token)
        try:
            statuses = [await streams.try_open() for _ in range(cap + 2)]
            assert sorted(statuses) == [200] * cap + [429] * 2, (name, statuses)
            key = fake.stats()["recent"][-1]["key"]
            assert max_in_flight(fake, key) == cap
        finally:
            await streams.close_all()
    await wait_for(lambda: held_per_worker(gateway) == {}, 10, "permits back")
    glob = next(r for r in gateway.caps() if r["scope"] == "global")
    assert (glob["cap"], glob["in_use"], glob["free"]) == (GLOBAL_CAP, 0, GLOBAL_CAP)


async def test_under_load_without_kills_the_audit_repairs_nothing(
    start_gateway: Callable[..., GatewayProcess], fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(
        workers=2,
        GATEWAY_CAP_AUDIT_INTERVAL=str(INTERVAL),
        PROXY_MAX_GLOBAL_CONCURRENT=str(GLOBAL_CAP),
    )
    tokens = {f"calm{i}": gateway.user_with_key(f"calm{i}", cap=3)[0] for i in range(4)}
    seen = await churn(gateway, tokens, seconds=12, kill_every=None, seed=1)
    assert seen.get("200", 0) > 100, seen
    await asyncio.sleep(INTERVAL * 2)  # quiet gates are judged once more
    assert repair_logs(gateway) == []
    assert repairs_made(gateway.namespace) == {"global": 0, "credential": 0}
    await assert_every_cap_exact(gateway, fake_upstream, tokens)


async def test_churn_with_worker_kills_ends_with_every_cap_exact(
    start_gateway: Callable[..., GatewayProcess], fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(
        workers=2,
        GATEWAY_CAP_AUDIT_INTERVAL=str(INTERVAL),
        PROXY_MAX_GLOBAL_CONCURRENT=str(GLOBAL_CAP),
    )
    tokens = {f"churn{i}": gateway.user_with_key(f"churn{i}", cap=3)[0] for i in range(4)}
    # A revoked token and a fresh one mid-run: the survivors keep their caps.
    revoked = gateway.create_user("revoked")
    gateway.put_key(revoked, key="sk-ant-test-revoked", cap=2)
    # Every 6.5 s: Granian takes a worker that dies within ~5.5 s of its respawn for a
    # crash loop and stops the server (the launcher then restarts it; not this test's aim).
    seen = await churn(gateway, tokens, seconds=27, kill_every=6.5, seed=2)  # 4 kills
    token_id = str(
        json.loads(gateway.cli("tokens", "list", "revoked", "--json").stdout.splitlines()[0])["id"]
    )
    gateway.cli("tokens", "revoke", token_id)
    assert seen.get("200", 0) > 100, seen
    assert seen.get("PUT 204", 0) > 20, seen
    # Quiet for a while: the reaper and the audit make every count exact.
    await asyncio.sleep(INTERVAL * 3)
    await assert_every_cap_exact(gateway, fake_upstream, tokens)
