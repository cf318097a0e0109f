"""A cap change is exact: requests still in flight count against the new cap.

Against a real `gateway serve` with two workers; the fake upstream's own in-flight count
per key is the ground truth.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from loadtests.fake_upstream import FakeUpstream
from storage import repository
from storage.engine import connected
from tests.fixtures.gateway import GatewayProcess
from tests.gateway.test_caps import HOLD, STREAM, first_chunk, held_per_worker, wait_for

pytestmark = pytest.mark.slow


class Streams:
    """SSE streams opened one at a time, each on its own connection, closed one at a time."""

    def __init__(self, gateway: GatewayProcess, token: str) -> None:
        self.gateway = gateway
        self.token = token
        self.open: list[tuple[httpx.AsyncClient, httpx.Response]] = []

    async def try_open(self, query: str = HOLD) -> int:
        """Open one stream; its status (a 200 stays open until closed)."""
        client = httpx.AsyncClient(timeout=30)
        request = client.build_request(
            "POST",
            f"{self.gateway.url}/v1/messages{query}",
            json=STREAM,
            headers={"x-api-key": self.token},
        )
        response = await client.send(request, stream=True)
        if response.status_code != 200:
            body = await response.aread()
            await response.aclose()
            await client.aclose()
            if response.status_code == 429:
                assert json.loads(body)["error"]["type"] == "overloaded_error"
            return response.status_code
        await first_chunk(response)
        self.open.append((client, response))
        return 200

    async def open_many(self, count: int) -> None:
        for _ in range(count):
            assert await self.try_open() == 200

    async def close_one(self) -> None:
        client, response = self.open.pop(0)
        await response.aclose()
        await client.aclose()

    async def close_all(self) -> None:
        while self.open:
            await self.close_one()


def in_flight(fake: FakeUpstream, key: str) -> int:
    return int(fake.stats()["keys"].get(key, {}).get("in_flight", 0))


def max_in_flight(fake: FakeUpstream, key: str) -> int:
    return int(fake.stats()["keys"][key]["max_in_flight"])


def my_row(gateway: GatewayProcess, user: str) -> dict[str, Any]:
    rows = [row for row in gateway.caps() if row.get("user") == user]
    assert len(rows) == 1, rows
    return rows[0]


async def admitted_of(gateway: GatewayProcess, token: str, tries: int) -> list[int]:
    """Statuses of ``tries`` quick non-streamed requests (each ends at once)."""
    statuses = []
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(tries):
            response = await client.post(
                f"{gateway.url}/v1/messages",
                json={**STREAM, "stream": False},
                headers={"x-api-key": token},
            )
            statuses.append(response.status_code)
    return statuses


async def test_a_lowered_cap_admits_nothing_until_in_flight_is_below_it(
    start_gateway: Callable[..., GatewayProcess], fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(workers=2)
    token, key = gateway.user_with_key("lowe", cap=8)
    streams = Streams(gateway, token)
    try:
        await streams.open_many(5)
        assert gateway.put_key(token, cap=2).status_code == 204
        row = my_row(gateway, "lowe")
        assert (row["cap"], row["in_use"], row["to_drain"], row["free"]) == (2, 5, 3, 0)
        table = gateway.cli("caps").stdout
        line = next(line for line in table.splitlines() if " lowe " in f" {line} ")
        assert line.split()[1:] == ["lowe", "2", "5", "0", "3"]
        for still_open in (5, 4, 3, 2):
            statuses = await admitted_of(gateway, token, 4)
            assert statuses == [429] * 4, (still_open, statuses)
            assert await streams.try_open() == 429
            assert in_flight(fake_upstream, key) == still_open
            await streams.close_one()
            await wait_for(
                lambda n=still_open: in_flight(fake_upstream, key) == n - 1, 5, "a stream to end"
            )
        # One in flight under a cap of 2: exactly one more gets in.
        assert await streams.try_open() == 200
        assert await streams.try_open() == 429
        assert in_flight(fake_upstream, key) == 2
        assert max_in_flight(fake_upstream, key) == 5  # never more than before the change
        fake_upstream.reset()
        await streams.close_all()
        await streams.open_many(2)
        for _ in range(4):
            assert await streams.try_open() == 429
        assert max_in_flight(fake_upstream, key) == 2
    finally:
        await streams.close_all()
    await wait_for(lambda: held_per_worker(gateway) == {}, 5, "permits back")
    row = my_row(gateway, "lowe")
    assert (row["cap"], row["in_use"], row["free"], row["to_drain"]) == (2, 0, 2, 0)


async def test_a_raised_cap_frees_exactly_the_extra_slots_at_once(
    start_gateway: Callable[..., GatewayProcess], fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(workers=2)
    token, key = gateway.user_with_key("rai", cap=2)
    streams = Streams(gateway, token)
    try:
        await streams.open_many(2)
        assert await streams.try_open() == 429
        assert gateway.put_key(token, cap=6).status_code == 204
        statuses = [await streams.try_open() for _ in range(7)]
        assert sorted(statuses) == [200] * 4 + [429] * 3
        assert in_flight(fake_upstream, key) == 6
        assert max_in_flight(fake_upstream, key) == 6
    finally:
        await streams.close_all()


async def test_many_changes_from_both_workers_and_the_cli_converge_on_the_last(
    start_gateway: Callable[..., GatewayProcess], fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(workers=2)
    token, key = gateway.user_with_key("conv", cap=4)
    rng = random.Random(10)
    streams = Streams(gateway, token)
    stop = asyncio.Event()

    async def churn() -> None:
        # Streams of ~0.3 s opening and closing all the while.
        async with httpx.AsyncClient(timeout=30) as client:
            while not stop.is_set():
                await client.post(
                    f"{gateway.url}/v1/messages?events=3&delay=0.1",
                    json=STREAM,
                    headers={"x-api-key": token},
                )

    churners = [asyncio.create_task(churn()) for _ in range(6)]
    last = 4
    try:
        for change in range(10):
            last = rng.randint(1, 6)
            if change % 3 == 2:
                await asyncio.to_thread(gateway.cli, "users", "set-cap", "conv", str(last))
            else:  # a new connection each time: Granian spreads them over the workers
                response = await asyncio.to_thread(gateway.put_key, token, cap=last)
                assert response.status_code == 204
            # Held streams open and close between changes too.
            if streams.open and rng.random() < 0.5:
                await streams.close_one()
            elif len(streams.open) < 3:
                await streams.try_open()
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.gather(*churners)
        await streams.close_all()
    await wait_for(lambda: held_per_worker(gateway) == {}, 5, "permits back")
    row = my_row(gateway, "conv")
    assert (row["cap"], row["in_use"], row["free"], row["to_drain"]) == (last, 0, last, 0)
    fake_upstream.reset()
    try:
        statuses = [await streams.try_open() for _ in range(last + 3)]
        assert sorted(statuses) == [200] * last + [429] * 3
        assert max_in_flight(fake_upstream, key) == last
    finally:
        await streams.close_all()


async def test_sigkill_of_a_worker_in_the_middle_of_a_lower_leaves_the_cap_exact(
    start_gateway: Callable[..., GatewayProcess], fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(workers=2)
    token, key = gateway.user_with_key("kil", cap=8)
    streams = Streams(gateway, token)
    try:
        for _ in range(20):  # until both workers hold some of the 6
            await streams.close_all()
            await wait_for(lambda: held_per_worker(gateway) == {}, 5, "permits back")
            await streams.open_many(6)
            if len(held_per_worker(gateway)) == 2:
                break
        spread = held_per_worker(gateway)
        assert len(spread) == 2, spread
        assert gateway.put_key(token, cap=2).status_code == 204  # 6 in flight, 4 to drain
        victim = max(spread, key=lambda pid: spread[pid])
        survivor_holds = sum(spread.values()) - spread[victim]
        os.kill(victim, signal.SIGKILL)

        def reaped() -> bool:
            row = my_row(gateway, "kil")
            return victim not in held_per_worker(gateway) and row["in_use"] == survivor_holds

        await wait_for(reaped, 5, "the dead worker's permits to come back")
        row = my_row(gateway, "kil")
        assert row["to_drain"] == max(0, survivor_holds - 2)
        if survivor_holds >= 2:
            assert await streams.try_open() == 429
        await wait_for(
            lambda: in_flight(fake_upstream, key) == survivor_holds, 5, "the killed streams to end"
        )
    finally:
        await streams.close_all()
    await wait_for(lambda: held_per_worker(gateway) == {}, 5, "permits back")
    row = my_row(gateway, "kil")
    assert (row["cap"], row["in_use"], row["free"], row["to_drain"]) == (2, 0, 2, 0)
    fake_upstream.reset()
    try:
        statuses = [await streams.try_open() for _ in range(5)]
        assert sorted(statuses) == [200, 200, 429, 429, 429]
        assert max_in_flight(fake_upstream, key) == 2
    finally:
        await streams.close_all()


def test_caps_lists_every_credential_with_a_stored_key(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(workers=2)
    gateway.user_with_key("never-used", cap=3)
    gateway.create_user("no-key")
    row = my_row(gateway, "never-used")
    assert (row["cap"], row["in_use"], row["free"], row["to_drain"]) == (3, 0, 3, 0)
    assert not [r for r in gateway.caps() if r.get("user") == "no-key"]


async def test_a_change_committed_by_a_process_that_died_before_applying_it_is_applied(
    start_gateway: Callable[..., GatewayProcess], fake_upstream: FakeUpstream
) -> None:
    """The row changes in the database and nobody resizes the gate or tells the workers
    (a worker killed right after its commit): the launcher's cap sync applies it."""
    gateway = start_gateway(workers=2)
    token, key = gateway.user_with_key("orphan", cap=8)
    user_id = uuid.UUID(my_row(gateway, "orphan")["user_id"])
    streams = Streams(gateway, token)
    try:
        await streams.open_many(3)
        async with connected(gateway.env["GATEWAY_DATABASE_URL"], migrated=False):
            change = await repository.update_cap(user_id, 1)
        assert change is not None

        def applied() -> bool:
            row = my_row(gateway, "orphan")
            return (row["cap"], row["in_use"], row["to_drain"]) == (1, 3, 2)

        await wait_for(applied, 10, "the launcher to apply the committed cap")
        assert await admitted_of(gateway, token, 4) == [429] * 4
        assert in_flight(fake_upstream, key) == 3
    finally:
        await streams.close_all()


def test_a_change_while_a_request_body_is_still_arriving_costs_it_nothing(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    """A settings change elsewhere lands while a request's body is on its way: the
    request is served, and no permit is left behind (found by review: gates used to be
    closed under requests on every change, with a 500 and a leaked global permit)."""
    gateway = start_gateway(workers=1, PROXY_MAX_GLOBAL_CONCURRENT="10")
    token_a, _ = gateway.user_with_key("alice", cap=4)
    token_b, _ = gateway.user_with_key("bob", cap=4)
    body = json.dumps({**STREAM, "stream": False}).encode()
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = (
            f"POST /v1/messages HTTP/1.1\r\nhost: {host}\r\nx-api-key: {token_a}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode()
        sock.sendall(head + body[:10])  # resolved and admitted; the rest is on its way
        time.sleep(0.5)
        gateway.cli("users", "set-cap", "bob", "3")  # a change: the counter moves
        other = httpx.post(
            f"{gateway.url}/v1/messages",
            content=body,
            headers={"x-api-key": token_b, "content-type": "application/json"},
            timeout=10,
        )
        assert other.status_code == 200
        sock.sendall(body[10:])
        status_line = sock.makefile("rb").readline()
    assert status_line.split()[1] == b"200"
    time.sleep(0.5)
    global_row = next(row for row in gateway.caps() if row["scope"] == "global")
    assert global_row["in_use"] == 0
