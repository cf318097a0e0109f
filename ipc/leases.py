"""Caps on Redis: the keys of one deployment, the Lua scripts, and one-shot operations.

A permit is a *lease*: a member of a sorted set per gate, scored by the moment it expires
(milliseconds of Redis's own clock, ``TIME``, so the hosts' clocks never matter). Keys
under one prefix (``GATEWAY_GATES_PREFIX``):

    {p}g              the global gate's leases
    {p}c:{user hex}   one credential's leases
    {p}k:{user hex}   that credential's cap in force: hash {v: cap version, cap}
    {p}gen            the change counter: INCR after every committed change
    {p}epoch          when admission may start (ms); missing = the store lost its data
    {p}global_cap     the global cap the last launcher started with (for ``gateway caps``)

**Admission** is one script: it checks the caller's change counter, then (for the global
gate and the credential's together) drops expired leases, counts, and adds the lease only
if both are under their caps. A lowered cap counts every live lease, old and new, because
the count is the set itself. The credential's cap in force is applied by version, as
``ipc.caps`` does with POSIX gates: a caller that read a newer row from the database pushes
it with its admission, and an older version never overwrites a newer one.

**Lost data.** A Redis restarted without persistence comes back empty: every live lease is
gone and the change counter starts over. The first script to notice (no ``epoch`` key)
sets the counter to a value no worker has seen (so every cached credential is reloaded)
and holds admission back for one lease time, while every live worker's renewal puts its
leases back; only then are the counts whole again and admission resumes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ipc.errors import GatesUnavailable

T = TypeVar("T")
Redis = aioredis.Redis  # for callers of ``Store.run`` (only ipc imports redis)

DEFAULT_PREFIX: Final = "gateway:"
# A store that does not answer within this long counts as unreachable (fail closed).
CONNECT_TIMEOUT: Final = 1.0
OPERATION_TIMEOUT: Final = 2.0

# Shared by the scripts: Redis's clock, and the recovery after lost data. KEYS[1] is the
# change counter, KEYS[2] the epoch; ARGV[1] the recovery (ms).
_PREAMBLE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ready = redis.call('GET', KEYS[2])
if not ready then
  ready = now + tonumber(ARGV[1])
  redis.call('SET', KEYS[2], string.format('%d', ready))
  redis.call('SET', KEYS[1], string.format('%d', now))
end
ready = tonumber(ready)
"""

# KEYS: counter, epoch, credential leases, credential cap, [global leases]
# ARGV: recovery ms, caller's counter, lease ms, lease id, cap version, cap, [global cap]
# -> {'ok', cap, counter} | {'global'|'credential', cap, counter} | {'stale', counter}
#    | {'recovering', ms left, counter}
ADMIT: Final = (
    _PREAMBLE
    + """
local gen = redis.call('GET', KEYS[1]) or '0'
if gen ~= ARGV[2] then return {'stale', 0, gen} end
if now < ready then return {'recovering', ready - now, gen} end
local stored = redis.call('HMGET', KEYS[4], 'v', 'cap')
local cap = tonumber(ARGV[6])
if stored[1] and tonumber(stored[1]) >= tonumber(ARGV[5]) then
  cap = tonumber(stored[2])
else
  redis.call('HSET', KEYS[4], 'v', ARGV[5], 'cap', ARGV[6])
end
local expiry = string.format('%d', now + tonumber(ARGV[3]))
if #KEYS == 5 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  if redis.call('ZCARD', KEYS[5]) >= tonumber(ARGV[7]) then
    return {'global', tonumber(ARGV[7]), gen}
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if redis.call('ZCARD', KEYS[3]) >= cap then return {'credential', cap, gen} end
if #KEYS == 5 then redis.call('ZADD', KEYS[5], expiry, ARGV[4]) end
redis.call('ZADD', KEYS[3], expiry, ARGV[4])
return {'ok', cap, gen}
"""
)

# KEYS: counter, epoch, then one gate's leases per lease to renew
# ARGV: recovery ms, lease ms, then the lease id for each of those KEYS (ARGV[i] for KEYS[i])
# -> the indexes (from 3) of leases that were gone; they are put back: still in flight.
RENEW: Final = (
    _PREAMBLE
    + """
local expiry = string.format('%d', now + tonumber(ARGV[2]))
local gone = {}
for i = 3, #KEYS do
  if not redis.call('ZSCORE', KEYS[i], ARGV[i]) then gone[#gone + 1] = i end
  redis.call('ZADD', KEYS[i], expiry, ARGV[i])
end
return gone
"""
)

# KEYS: credential cap; ARGV: cap version, cap. Applied unless a later version is.
PUSH_CAP: Final = """
local stored = redis.call('HGET', KEYS[1], 'v')
if stored and tonumber(stored) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'cap', ARGV[2])
return 1
"""

# KEYS: counter, epoch; ARGV: recovery ms -> ms until admission may start (0: now)
READY: Final = (
    _PREAMBLE
    + """
if now < ready then return ready - now end
return 0
"""
)

# KEYS: leases of each gate to read -> live leases per gate (expired ones dropped)
COUNT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local counts = {}
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  counts[i] = redis.call('ZCARD', KEYS[i])
end
return counts
"""


class Keys:
    """The key names of one deployment (one prefix)."""

    __slots__ = ("epoch", "generation", "global_cap", "global_leases", "prefix")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.global_cap = f"{prefix}global_cap"
        self.generation = f"{prefix}gen"
        self.epoch = f"{prefix}epoch"
        self.global_leases = f"{prefix}g"

    def leases(self, user_id: uuid.UUID) -> str:
        return f"{self.prefix}c:{user_id.hex}"

    def cap(self, user_id: uuid.UUID) -> str:
        return f"{self.prefix}k:{user_id.hex}"


def connect(url: str) -> aioredis.Redis:
    """A client on ``url`` that fails fast: no retries of its own (the caller decides),
    short timeouts, so an unreachable store costs a request a second, not minutes."""
    client: aioredis.Redis = aioredis.Redis.from_url(
        url,
        retry=Retry(NoBackoff(), 0),
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=OPERATION_TIMEOUT,
    )
    return client


async def translated(call: Awaitable[T]) -> T:
    """Await a Redis call; its failures become ``GatesUnavailable``."""
    try:
        return await call
    except (RedisError, OSError) as exc:
        raise GatesUnavailable(f"{type(exc).__name__}: {exc}") from exc


def recovery_ms(lease_seconds: float) -> int:
    """After lost data, admission waits one lease time: every live worker renews within it."""
    return max(1, round(lease_seconds * 1000))


class CapReading(msgspec.Struct, frozen=True):
    """One gate as it stands in Redis."""

    user_id: uuid.UUID | None  # None: the global gate
    cap: int | None  # the cap in force (None: no credential cap pushed yet)
    in_use: int  # live leases


class Started(msgspec.Struct, frozen=True):
    wait: float  # seconds until admission may start
    recorded: bool  # whether a launcher recorded a global cap before
    previous_cap: int | None


class Store:
    """One-shot operations for the command line and the launcher (a client per call site)."""

    def __init__(self, url: str, prefix: str, *, lease_seconds: float) -> None:
        self.url = url
        self.keys = Keys(prefix)
        self.lease_seconds = lease_seconds

    def run(self, work: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run ``work`` on a fresh client in its own event loop (sync callers)."""
        return asyncio.run(self.call(work))

    async def call(self, work: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Await ``work`` on a fresh client; its failures become ``GatesUnavailable``."""
        client = connect(self.url)
        try:
            return await translated(work(client))
        finally:
            await client.aclose()

    async def announce(
        self,
        client: aioredis.Redis,
        *,
        cap: tuple[uuid.UUID, int, int] | None = None,
        deleted_user: uuid.UUID | None = None,
    ) -> int:
        """After a committed change: push a cap (user, version, cap) by version, forget a
        deleted user's cap, then move the change counter; the new counter."""
        return await announce(client, self.keys, cap=cap, deleted_user=deleted_user)

    async def ready_in(self, client: aioredis.Redis) -> float:
        """Seconds until admission may start (0 unless the store just lost its data)."""
        keys = self.keys
        waited = await client.eval(
            READY, 2, keys.generation, keys.epoch, recovery_ms(self.lease_seconds)
        )
        return int(waited) / 1000

    def start(self, global_cap: int | None) -> Started:
        """For a launcher: record the global cap it starts with (``gateway caps`` shows
        it), and learn the one recorded before and how long admission must wait."""

        async def work(client: aioredis.Redis) -> Started:
            previous = await client.getset(
                self.keys.global_cap, "none" if global_cap is None else global_cap
            )
            return Started(
                wait=await self.ready_in(client),
                recorded=previous is not None,
                previous_cap=None if previous in (None, b"none") else int(previous),
            )

        return self.run(work)

    async def global_cap(self, client: aioredis.Redis) -> int | None:
        value = await client.get(self.keys.global_cap)
        return None if value in (None, b"none") else int(value)

    async def readings(
        self, client: aioredis.Redis, users: Sequence[uuid.UUID]
    ) -> list[CapReading]:
        """The global gate, then each of ``users``: cap in force and live leases."""
        keys = self.keys
        names = [keys.global_leases, *(keys.leases(user) for user in users)]
        counts = await client.eval(COUNT, len(names), *names)
        caps: list[Any] = []
        if users:
            async with client.pipeline(transaction=False) as pipe:
                for user in users:
                    pipe.hget(keys.cap(user), "cap")
                caps = await pipe.execute()
        rows = [CapReading(user_id=None, cap=None, in_use=int(counts[0]))]
        for user, count, cap in zip(users, counts[1:], caps, strict=True):
            rows.append(
                CapReading(user_id=user, cap=None if cap is None else int(cap), in_use=int(count))
            )
        return rows


async def announce(
    client: aioredis.Redis,
    keys: Keys,
    *,
    cap: tuple[uuid.UUID, int, int] | None = None,
    deleted_user: uuid.UUID | None = None,
) -> int:
    async with client.pipeline(transaction=False) as pipe:
        if cap is not None:
            user, version, value = cap
            pipe.eval(PUSH_CAP, 1, keys.cap(user), str(version), str(value))
        if deleted_user is not None:
            pipe.delete(keys.cap(deleted_user))
        pipe.incr(keys.generation)
        results = await pipe.execute()
    return int(results[-1])
