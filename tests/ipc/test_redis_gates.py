"""Shared gates on Redis leases, against the real Redis: caps, versions, leases, outages."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from ipc.errors import GatesUnavailable
from ipc.gates import Permit, Rejected
from ipc.leases import Keys, Store
from ipc.redis_gates import LeasePermit, RedisGatekeeper, Stale
from tests.fixtures.redis import ThrowawayRedis, delete_prefix, mark_ready, redis_client

GLOBAL_CAP = 5
LEASE = 0.9  # renewals every 0.3 s


@pytest.fixture
async def keepers(redis_url: str, redis_prefix: str) -> AsyncIterator[Callable[..., Any]]:
    """Open gatekeepers (stand-ins for workers, on any hosts) on the test's prefix."""
    opened: list[RedisGatekeeper] = []

    async def open_keeper(
        *, global_cap: int | None = GLOBAL_CAP, lease: float = LEASE, url: str = redis_url
    ) -> RedisGatekeeper:
        keeper = RedisGatekeeper(url, redis_prefix, global_cap=global_cap, lease_seconds=lease)
        await keeper.open()
        opened.append(keeper)
        return keeper

    yield open_keeper
    for keeper in opened:
        await keeper.close()


async def admit(keeper: RedisGatekeeper, user: uuid.UUID, cap: int, version: int = 1) -> Any:
    """Admit as a worker does: a Stale answer means read again (here: the same row)."""
    for _ in range(3):
        result = await keeper.admit(keeper.credential_gate(user, version, cap))
        if not isinstance(result, Stale):
            return result
    raise AssertionError("stale three times in a row")


def live(prefix: str, name: str) -> int:
    client = redis_client()
    now_ms = int(time.time() * 1000) - 5000  # scores are Redis ms; a lease is never older
    count = client.zcount(f"{prefix}{name}", now_ms, "+inf")
    client.close()
    return int(count)


async def settle() -> None:
    """Releases leave on the next turns of the loop."""
    await asyncio.sleep(0.05)


async def test_credential_cap_then_global_cap(
    keepers: Callable[..., Any], redis_prefix: str
) -> None:
    one, two = await keepers(), await keepers()  # two workers, perhaps on two hosts
    alice, bob = uuid.uuid4(), uuid.uuid4()
    held = [await admit(one, alice, 3), await admit(two, alice, 3), await admit(one, alice, 3)]
    assert all(isinstance(permit, LeasePermit) for permit in held)
    assert await admit(two, alice, 3) == Rejected(scope="credential", cap=3)
    # A credential refusal takes no global lease.
    assert live(redis_prefix, "g") == 3
    held += [await admit(two, bob, 4), await admit(one, bob, 4)]
    assert await admit(one, bob, 4) == Rejected(scope="global", cap=GLOBAL_CAP)
    assert live(redis_prefix, f"c:{bob.hex}") == 2  # a global refusal takes nothing either
    held[0].release()
    assert held[0].release() is False  # idempotent
    await settle()
    assert isinstance(await admit(two, bob, 4), Permit)
    assert live(redis_prefix, "g") == GLOBAL_CAP


async def test_a_lowered_cap_counts_every_live_lease(keepers: Callable[..., Any]) -> None:
    one, two = await keepers(global_cap=None), await keepers(global_cap=None)
    user = uuid.uuid4()
    held = [await admit(one, user, 4, version=1) for _ in range(2)]
    held += [await admit(two, user, 4, version=1) for _ in range(2)]
    # Another worker read the lowered cap (version 2): from now on it binds everyone.
    assert await admit(two, user, 2, version=2) == Rejected(scope="credential", cap=2)
    # A worker still holding version 1 cannot bring the old cap back.
    assert await admit(one, user, 4, version=1) == Rejected(scope="credential", cap=2)
    for permit in held[:2]:
        permit.release()
    await settle()
    assert await admit(one, user, 4, version=1) == Rejected(scope="credential", cap=2)
    held[2].release()
    await settle()
    assert isinstance(await admit(one, user, 4, version=1), Permit)
    # Raised again (version 3): the extra slots are there at once.
    assert isinstance(await admit(two, user, 5, version=3), Permit)
    assert isinstance(await admit(two, user, 5, version=3), Permit)


async def test_a_change_anywhere_makes_cached_credentials_stale(
    keepers: Callable[..., Any], redis_url: str, redis_prefix: str
) -> None:
    keeper = await keepers()
    user = uuid.uuid4()
    assert isinstance(await admit(keeper, user, 2), Permit)
    cached = keeper.credential_gate(user, 1, 2)
    store = Store(redis_url, redis_prefix, lease_seconds=LEASE)
    await store.call(lambda client: store.announce(client))  # a change committed on another host
    before = live(redis_prefix, f"c:{user.hex}")
    answer = await keeper.admit(cached)
    assert isinstance(answer, Stale)
    assert live(redis_prefix, f"c:{user.hex}") == before  # nothing was taken
    assert keeper.generation() == answer.generation
    assert isinstance(await keeper.admit(keeper.credential_gate(user, 1, 2)), Permit)


async def test_announced_cap_applies_by_version(
    keepers: Callable[..., Any], redis_url: str, redis_prefix: str
) -> None:
    keeper = await keepers(global_cap=None)
    user = uuid.uuid4()
    store = Store(redis_url, redis_prefix, lease_seconds=LEASE)
    await store.call(lambda client: store.announce(client, cap=(user, 10, 1)))
    await store.call(lambda client: store.announce(client, cap=(user, 9, 5)))  # older: ignored
    assert isinstance(await admit(keeper, user, 5, version=9), Permit)
    assert await admit(keeper, user, 5, version=9) == Rejected(scope="credential", cap=1)
    readings = await store.call(lambda client: store.readings(client, [user]))
    assert [(r.cap, r.in_use) for r in readings] == [(None, 0), (1, 1)]


async def test_leases_of_a_dead_worker_expire_and_live_ones_are_renewed(
    keepers: Callable[..., Any], redis_prefix: str
) -> None:
    user = uuid.uuid4()
    survivor, victim = await keepers(global_cap=None), await keepers(global_cap=None)
    assert isinstance(await admit(survivor, user, 2), Permit)
    assert isinstance(await admit(victim, user, 2), Permit)
    # The victim dies without a word: no release, no more renewals.
    assert victim._keeper is not None
    victim._keeper.cancel()
    victim._live.clear()
    victim._releases.clear()
    await asyncio.sleep(LEASE * 2.5)  # several lease times: the survivor's lease is renewed
    assert live(redis_prefix, f"c:{user.hex}") == 2  # (the count before expired ones drop)
    assert isinstance(await admit(survivor, user, 2), Permit)  # the victim's slot came back
    assert await admit(survivor, user, 2) == Rejected(scope="credential", cap=2)


async def test_a_lease_found_gone_is_put_back_counted_and_logged(
    keepers: Callable[..., Any], redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    keeper = await keepers(global_cap=None)
    user = uuid.uuid4()
    permit = await admit(keeper, user, 1)
    assert isinstance(permit, Permit)
    client = redis_client()
    client.delete(f"{redis_prefix}c:{user.hex}")  # as expiry after a long stall would
    with caplog.at_level(logging.WARNING, logger="ipc.redis_gates"):
        await asyncio.sleep(LEASE / 3 + 0.3)
    assert keeper.leases_lost == 1
    assert "live leases were gone" in caplog.text
    assert client.zcard(f"{redis_prefix}c:{user.hex}") == 1  # still in flight: counted again
    assert await admit(keeper, user, 1) == Rejected(scope="credential", cap=1)
    permit.release()
    await settle()
    assert client.zcard(f"{redis_prefix}c:{user.hex}") == 0
    client.close()


async def test_after_lost_data_admission_waits_for_every_live_lease(
    keepers: Callable[..., Any], redis_prefix: str
) -> None:
    """Redis restarted empty: every cache reloads, and nothing is admitted until the
    leases still in flight have been put back, so the cap holds across the restart."""
    one, two = await keepers(global_cap=None), await keepers(global_cap=None)
    user = uuid.uuid4()
    held = [await admit(one, user, 2), await admit(two, user, 2)]
    assert all(isinstance(permit, Permit) for permit in held)
    client = redis_client()
    delete_prefix(client, redis_prefix)  # everything, the epoch and counter too
    cached = one.credential_gate(user, 1, 2)
    assert isinstance(await one.admit(cached), Stale)  # every cached credential reloads
    with pytest.raises(GatesUnavailable, match="recovering"):
        await one.admit(one.credential_gate(user, 1, 2))
    await asyncio.sleep(LEASE + 0.2)
    assert await admit(two, user, 2) == Rejected(scope="credential", cap=2)
    assert one.leases_lost + two.leases_lost == 2
    held[0].release()
    await settle()
    assert isinstance(await admit(two, user, 2), Permit)
    client.close()


async def test_waiting_for_a_slot(keepers: Callable[..., Any]) -> None:
    one, two = await keepers(global_cap=None), await keepers(global_cap=None)
    user = uuid.uuid4()
    permit = await admit(one, user, 1)
    assert isinstance(permit, Permit)
    refused = await two.admit_waiting(two.credential_gate(user, 1, 1), within=0.3)
    assert isinstance(refused, Rejected) and refused.scope == "credential"
    assert refused.waited >= 0.3
    waiting = asyncio.create_task(two.admit_waiting(two.credential_gate(user, 1, 1), within=5))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    started = time.monotonic()
    permit.release()  # released on another worker (or host): seen by the next poll
    assert isinstance(await waiting, Permit)
    assert time.monotonic() - started < 1.0
    # A waiter whose client left takes nothing with it.
    gone = asyncio.create_task(one.admit_waiting(one.credential_gate(user, 1, 1), within=5))
    await asyncio.sleep(0.1)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert one.live_leases == 0


async def test_unreachable_store_fails_closed_once_per_outage_and_recovers(
    throwaway_redis: ThrowawayRedis, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = "outage:"
    mark_ready(throwaway_redis.client(), prefix)
    keeper = RedisGatekeeper(throwaway_redis.url, prefix, global_cap=3, lease_seconds=LEASE)
    await keeper.open()
    try:
        user = uuid.uuid4()
        held = await admit(keeper, user, 2)
        assert isinstance(held, Permit)
        throwaway_redis.stop()
        with caplog.at_level(logging.WARNING, logger="ipc.redis_gates"):
            for _ in range(20):
                with pytest.raises(GatesUnavailable):
                    await keeper.admit(keeper.credential_gate(user, 1, 2))
            held.release()  # a release during the outage is kept and retried
            await asyncio.sleep(0.3)
            assert caplog.text.count("is unreachable") == 1  # one line per outage
            throwaway_redis.start()  # back, empty (it lost its data)
            mark_ready(throwaway_redis.client(), prefix)  # (recovery has its own test)
            deadline = time.monotonic() + 5
            while True:
                try:
                    result = await admit(keeper, user, 2)
                    break
                except GatesUnavailable:
                    assert time.monotonic() < deadline, "never recovered"
                    await asyncio.sleep(0.1)
        assert isinstance(result, Permit)
        assert caplog.text.count("answers again") == 1
        assert keeper.live_leases == 1
    finally:
        await keeper.close()


def test_keys_of_a_deployment() -> None:
    keys = Keys("p:")
    user = uuid.UUID(int=1)
    assert (keys.generation, keys.epoch, keys.global_leases) == ("p:gen", "p:epoch", "p:g")
    assert keys.leases(user) == f"p:c:{user.hex}"
    assert keys.cap(user) == f"p:k:{user.hex}"
