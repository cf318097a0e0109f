"""The optional wait for a slot, against a real two-worker gateway and the fake upstream."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable

import httpx
import pytest

from loadtests.fake_upstream import FakeUpstream
from tests.fixtures.gateway import GatewayProcess
from tests.gateway.test_cap_change import Streams, max_in_flight, my_row
from tests.gateway.test_caps import STREAM, held_per_worker, wait_for
from tests.gateway.test_metrics import until, value

pytestmark = pytest.mark.slow


async def post_stream(
    gateway: GatewayProcess, token: str, query: str, *, timeout: float = 60
) -> httpx.Response:
    async with httpx.AsyncClient(timeout=timeout) as client:
        response = await client.post(
            f"{gateway.url}/v1/messages{query}", json=STREAM, headers={"x-api-key": token}
        )
        await response.aread()
        return response


def inversions(order: list[int]) -> tuple[int, int]:
    """(pairs served out of arrival order, the largest distance one was served early)."""
    pairs = sum(1 for i, a in enumerate(order) for b in order[i + 1 :] if a > b)
    early = max((arrival - served for served, arrival in enumerate(order)), default=0)
    return pairs, max(0, early)


async def test_six_one_second_streams_on_cap_two_all_succeed(
    start_gateway: Callable[..., GatewayProcess], fake_upstream: FakeUpstream
) -> None:
    """The issue's own case: GATEWAY_QUEUE_TIMEOUT=10, cap 2, 6 concurrent one-second
    streams on one credential across 2 workers."""
    gateway = start_gateway(workers=2, GATEWAY_QUEUE_TIMEOUT="10")
    token, key = gateway.user_with_key("patient", cap=2)
    responses = await asyncio.gather(
        *(post_stream(gateway, token, "?events=10&delay=0.1") for _ in range(6))
    )
    assert [r.status_code for r in responses] == [200] * 6
    assert all("event: message_stop" in r.text for r in responses)
    assert max_in_flight(fake_upstream, key) == 2
    waited = [r for r in gateway.log_records() if r.get("logger") == "gateway.access"]
    assert sum(1 for r in waited if r.get("waited_ms", 0) > 500) >= 2, waited
    await wait_for(lambda: held_per_worker(gateway) == {}, 5, "permits back")


async def test_a_waiter_out_of_time_gets_the_429_with_how_long_it_waited(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(workers=2, GATEWAY_QUEUE_TIMEOUT="0.5")
    token, _ = gateway.user_with_key("late", cap=1)
    streams = Streams(gateway, token)
    try:
        await streams.open_many(1)
        started = time.monotonic()
        response = await post_stream(gateway, token, "")
        elapsed = time.monotonic() - started
        assert response.status_code == 429
        assert response.headers["x-should-retry"] == "true"
        assert response.headers["retry-after"].isdigit()
        assert response.headers["x-gateway-overloaded-scope"] == "credential"
        error = response.json()["error"]
        assert error["type"] == "overloaded_error"
        assert error["message"].startswith("Too many concurrent requests against this credential")
        assert error["message"].endswith("(waited 0.5 s)"), error["message"]
        assert 0.5 <= elapsed < 5
    finally:
        await streams.close_all()
    rejected = [r for r in gateway.log_records() if r.get("status") == 429 and "waited_ms" in r]
    assert rejected and rejected[0]["waited_ms"] >= 500
    samples = await until(
        gateway,
        lambda s: value(s, "gateway_queue_timeouts_total", scope="credential") == 1,
        "the timeout counted",
    )
    assert value(samples, "gateway_queue_wait_seconds_count") == 1
    assert (value(samples, "gateway_queue_wait_seconds_sum") or 0) >= 0.5


async def test_over_the_waiter_limit_is_refused_at_once(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(
        workers=2, GATEWAY_QUEUE_TIMEOUT="20", GATEWAY_QUEUE_MAX_WAITERS="2"
    )
    token, _ = gateway.user_with_key("crowd", cap=1)
    streams = Streams(gateway, token)
    try:
        await streams.open_many(1)
        waiting = [asyncio.create_task(post_stream(gateway, token, "")) for _ in range(2)]
        await wait_for(lambda: my_row(gateway, "crowd")["in_use"] == 1, 5, "holder")
        samples = await until(  # both are in line now
            gateway,
            lambda s: value(s, "gateway_queue_waiting", scope="credential") == 2,
            "two waiters in line",
        )
        assert value(samples, "gateway_queue_waiting", scope="global") == 0
        started = time.monotonic()
        refused = await post_stream(gateway, token, "")
        assert refused.status_code == 429
        assert time.monotonic() - started < 2
        assert "(waited" not in refused.json()["error"]["message"]
        await streams.close_all()
        assert [r.status_code for r in await asyncio.gather(*waiting)] == [200, 200]
    finally:
        await streams.close_all()


async def test_a_waiter_whose_client_goes_leaves_the_line_and_takes_nothing(
    start_gateway: Callable[..., GatewayProcess], fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(workers=2, GATEWAY_QUEUE_TIMEOUT="30")
    token, key = gateway.user_with_key("quitter", cap=1)
    streams = Streams(gateway, token)
    try:
        await streams.open_many(1)
        leaving = asyncio.create_task(post_stream(gateway, token, "?events=1"))
        await asyncio.sleep(0.5)
        leaving.cancel()  # the client hangs up while in line
        with pytest.raises(asyncio.CancelledError):
            await leaving
        staying = asyncio.create_task(post_stream(gateway, token, "?events=1"))
        await asyncio.sleep(0.5)
        fake_upstream.reset()
        await streams.close_all()
        assert (await staying).status_code == 200
        # Only the one that stayed reached the upstream; the one that left took no slot.
        assert fake_upstream.stats()["keys"][key]["total"] == 1
    finally:
        await streams.close_all()
    await wait_for(lambda: held_per_worker(gateway) == {}, 5, "permits back")
    row = my_row(gateway, "quitter")
    assert (row["in_use"], row["free"]) == (0, 1)


async def test_waiters_are_served_close_to_arrival_order_across_workers(
    start_gateway: Callable[..., GatewayProcess], fake_upstream: FakeUpstream
) -> None:
    """200 waiters spread over both workers: every one is served (no starvation) and the
    order they reach the upstream is measured against the order they arrived."""
    gateway = start_gateway(
        workers=2, GATEWAY_QUEUE_TIMEOUT="120", GATEWAY_QUEUE_MAX_WAITERS="256"
    )
    token, key = gateway.user_with_key("fifo", cap=2)
    streams = Streams(gateway, token)
    await streams.open_many(2)  # everyone after these waits
    fake_upstream.reset()
    tasks = []
    for index in range(200):
        tasks.append(
            asyncio.create_task(post_stream(gateway, token, f"?events=1&delay=0.01&n={index}"))
        )
        await asyncio.sleep(0.004)  # arrivals 4 ms apart: an order to keep
    await asyncio.sleep(0.5)
    await streams.close_all()
    responses = await asyncio.gather(*tasks)
    assert [r.status_code for r in responses] == [200] * 200
    seen = [s for s in fake_upstream.stats()["recent"] if s["key"] == key]
    order = [int(dict(p.split("=") for p in s["query"].split("&"))["n"]) for s in seen]
    assert sorted(order) == list(range(200))
    assert max_in_flight(fake_upstream, key) == 2
    pairs, early = inversions(order)
    report = {
        "waiters": 200,
        "inverted_pairs": pairs,
        "of_pairs": 200 * 199 // 2,
        "served_early_by_at_most": early,
        "served_in_exact_order": sum(1 for i, n in enumerate(order) if i == n),
    }
    print("FIFO report:", json.dumps(report))
    await wait_for(lambda: held_per_worker(gateway) == {}, 5, "permits back")


async def test_sigkill_of_a_worker_with_waiters_and_holders_leaves_every_cap_exact(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(workers=2, GATEWAY_QUEUE_TIMEOUT="30")
    token, _ = gateway.user_with_key("killq", cap=2)
    streams = Streams(gateway, token)
    await streams.open_many(2)
    waiting = [asyncio.create_task(post_stream(gateway, token, "?events=1")) for _ in range(6)]
    await asyncio.sleep(1.0)
    victim = max(held_per_worker(gateway).items(), key=lambda item: item[1])[0]
    os.kill(victim, signal.SIGKILL)
    await asyncio.gather(*waiting, return_exceptions=True)
    await streams.close_all()
    await wait_for(lambda: held_per_worker(gateway) == {}, 10, "permits back")
    await wait_for(lambda: my_row(gateway, "killq")["in_use"] == 0, 10, "the gate exact")
    # The line's places came back with the dead worker's ledger: a full line again.
    again = Streams(gateway, token)
    try:
        statuses = [await again.try_open() for _ in range(2)]
        assert statuses == [200, 200]
    finally:
        await again.close_all()
    row = my_row(gateway, "killq")
    await wait_for(lambda: my_row(gateway, "killq")["in_use"] == 0, 10, "permits back")
    assert row["cap"] == 2
