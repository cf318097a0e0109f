"""A worker's gates on Redis leases: admission, release, renewal, and outages.

The same promises as the POSIX gates (``ipc.gates``), across hosts (``ipc.leases`` has the
keys and scripts):

- **Admission** is one round trip: one script admits through the global gate and the
  credential's together, or says which was full; it also says when the caller's cached
  credential predates a change committed anywhere (``Stale``): the caller reloads it and
  asks again. Nothing is taken on a stale or refused answer.
- **Release** (``LeasePermit.release``) stays synchronous and idempotent: the lease leaves
  this worker's books at once and its ``ZREM`` is sent on the next turn of the loop (in one
  pipeline with any other releases of that turn), retried while the store does not
  answer; lease expiry reclaims whatever cannot be sent.
- **Renewal**: every third of a lease time one script extends every live lease of the
  worker. A lease found gone (the store lost its data, or this worker stalled past its
  lease) is put back, since its request is still in flight, and counted and logged.
  Releases and renewals leave from one task, in order, so a renewal never puts back a
  lease whose release was already sent.
- **Outages** fail closed: ``GatesUnavailable`` (the proxy's 503). While the store is down,
  admissions fail at once but for one real try every ``PROBE_INTERVAL``; one log line when
  it goes, one when it comes back. After an outage every cached credential is reloaded
  (a change committed meanwhile may not have been announced).

A host that dies, loses its network or is SIGKILLed gives its slots back within one lease
time: nobody renews its leases, and admission drops expired ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
import uuid
from typing import Final

import msgspec
from redis.exceptions import RedisError

from ipc.errors import GatesUnavailable
from ipc.gates import Permit, Rejected
from ipc.leases import ADMIT, COUNT, RENEW, Keys, announce, connect, recovery_ms, translated

log = logging.getLogger("ipc.redis_gates")

PROBE_INTERVAL: Final = 0.5
# Renewals in one script call at most (each lease once per gate it holds).
RENEW_BATCH: Final = 1000
# Waiting for a slot: polls start this far apart and double up to the cap, with jitter.
FIRST_POLL: Final = 0.005
MAX_POLL: Final = 0.2


class LeaseGate:
    """A credential's gate as this worker read it: its cap row, and the change counter it
    was read under (an admission with an older counter is answered ``Stale``)."""

    __slots__ = ("cap", "cap_key", "generation", "leases_key", "user_id", "version")

    def __init__(
        self, keys: Keys, user_id: uuid.UUID, version: int, cap: int, generation: str
    ) -> None:
        self.user_id = user_id
        self.version = version
        self.cap = cap
        self.generation = generation
        self.leases_key = keys.leases(user_id)
        self.cap_key = keys.cap(user_id)


class Stale(msgspec.Struct, frozen=True):
    """A change was committed since the credential was read: reload it, then admit again."""

    generation: str


class LeasePermit(Permit):
    """What an admitted request holds on Redis: one lease in one or two gates."""

    __slots__ = ("_keeper", "_lease", "_sets")

    def __init__(self, keeper: RedisGatekeeper, lease: str, sets: tuple[str, ...]) -> None:
        self._keeper = keeper
        self._lease = lease
        self._sets = sets
        self.released = False

    def release(self) -> bool:
        """Synchronous and idempotent; the network part leaves on the next loop turn."""
        if self.released:
            return False
        self.released = True
        self._keeper.give_back(self._lease, self._sets)
        return True


class RedisGatekeeper:
    """A worker's view of the shared gates: its live leases and the change counter."""

    shared: Final = True

    def __init__(
        self, url: str, prefix: str, *, global_cap: int | None, lease_seconds: float
    ) -> None:
        self.keys = Keys(prefix)
        self.global_cap = global_cap
        self.lease_seconds = lease_seconds
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self._recovery_ms = recovery_ms(lease_seconds)
        self._client = connect(url)
        self._admit = self._client.register_script(ADMIT)
        self._renew = self._client.register_script(RENEW)
        self._count = self._client.register_script(COUNT)
        self._worker = secrets.token_hex(6)
        self._serial = 0
        self._live: dict[str, tuple[str, ...]] = {}  # lease -> the sets it is in
        self._releases: list[tuple[str, tuple[str, ...], float]] = []  # + give up after
        self._wake: asyncio.Event | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._known = ""  # the change counter as last seen; "" = not known
        self._down_since: float | None = None
        self._last_try = 0.0
        self.leases_lost = 0  # leases a renewal found gone (and put back)

    # -- life ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Start the keeper task; learn the change counter if the store answers (if not,
        the first admission learns it)."""
        self._wake = asyncio.Event()
        self._keeper = asyncio.get_running_loop().create_task(self._keep())
        try:
            value = await translated(self._client.get(self.keys.generation))
        except GatesUnavailable as exc:
            self._failed(exc)
        else:
            self._known = "0" if value is None else _text(value)

    async def close(self) -> None:
        """Stop renewing and send what releases are pending (one try)."""
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
            self._keeper = None
        if self._releases:
            with contextlib.suppress(GatesUnavailable):  # lease expiry reclaims them
                await self._send_releases()
        await self._client.aclose()

    # -- the change counter ---------------------------------------------------------------

    def generation(self) -> str:
        return self._known

    def credential_gate(self, user_id: uuid.UUID, cap_version: int, cap: int) -> LeaseGate:
        return LeaseGate(self.keys, user_id, cap_version, cap, self._known)

    def forget_credential_gates(self) -> None:
        """Nothing is held per credential between requests here."""

    def drop_deleted_gates(self) -> None:
        """Nothing is held per credential between requests here."""

    async def announce(
        self,
        *,
        cap: tuple[uuid.UUID, int, int] | None = None,
        deleted_user: uuid.UUID | None = None,
    ) -> None:
        """After a committed change: push the cap (by version) and move the counter."""
        await translated(announce(self._client, self.keys, cap=cap, deleted_user=deleted_user))

    async def in_use(self, user_id: uuid.UUID) -> int:
        """Live leases of a credential across every host (expired ones dropped first)."""
        counts = await translated(self._count(keys=[self.keys.leases(user_id)]))
        return int(counts[0])

    async def ping(self) -> None:
        """Raises ``GatesUnavailable`` unless the store answers."""
        await translated(self._client.ping())

    # -- admission -----------------------------------------------------------------------

    async def admit(self, gate: LeaseGate) -> LeasePermit | Rejected | Stale:
        """One round trip. Raises ``GatesUnavailable`` when the store does not answer or
        is still recovering from lost data."""
        was_down = self._guard()
        self._serial += 1
        lease = f"{self._worker}.{self._serial}"
        keys = self.keys
        global_cap = self.global_cap
        sets: tuple[str, ...]
        args: list[str | int]
        if global_cap is None:
            sets = (gate.leases_key,)
            names = [keys.generation, keys.epoch, gate.leases_key, gate.cap_key]
            args = [self._recovery_ms, gate.generation, self._lease_ms, lease]
            args += [gate.version, gate.cap]
        else:
            sets = (keys.global_leases, gate.leases_key)
            names = [keys.generation, keys.epoch, gate.leases_key, gate.cap_key]
            names.append(keys.global_leases)
            args = [self._recovery_ms, gate.generation, self._lease_ms, lease]
            args += [gate.version, gate.cap, global_cap]
        try:
            reply = await self._admit(keys=names, args=args)
        except asyncio.CancelledError:
            # The script may have run: take the lease back (harmless if it never was).
            self.give_back(lease, sets)
            raise
        except (RedisError, OSError) as exc:
            self.give_back(lease, sets)
            self._failed(exc)
            raise GatesUnavailable(f"{type(exc).__name__}: {exc}") from exc
        self._answered()
        verdict, value, generation = reply[0], int(reply[1]), _text(reply[2])
        if verdict == b"ok":
            if was_down:
                # The first answer after an outage: the credential was read before it, and
                # a change committed meanwhile may never have been announced. Read it again.
                self.give_back(lease, sets)
                return Stale(generation=self._known)
            self._live[lease] = sets
            return LeasePermit(self, lease, sets)
        if verdict == b"credential":
            gate.cap = value
            return Rejected(scope="credential", cap=value)
        if verdict == b"global":
            return Rejected(scope="global", cap=value)
        if verdict == b"stale":
            self._saw(generation)
            return Stale(generation=generation)
        raise GatesUnavailable(f"recovering from lost data: admission resumes in {value} ms")

    async def admit_waiting(
        self, gate: LeaseGate, *, within: float
    ) -> LeasePermit | Rejected | Stale:
        """Admit, trying again while over a cap for up to ``within`` seconds.

        Polls with exponential backoff and jitter (from 5 ms up to 200 ms apart): no
        connection is held per waiter, a release anywhere (or a dead host's expired
        lease) is seen by the next poll, and the jitter keeps waiters on many hosts from
        polling in step. Nothing is held while waiting; cancellation (the client left)
        leaves at once. Measured against a blocking pop on a per-gate list (README,
        "Several hosts"): a hand-over as quick, without a connection per waiter.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        delay = FIRST_POLL
        while True:
            admitted = await self.admit(gate)
            left = within - (loop.time() - started)
            if not isinstance(admitted, Rejected) or left <= 0:
                if isinstance(admitted, Rejected):
                    return Rejected(
                        scope=admitted.scope, cap=admitted.cap, waited=loop.time() - started
                    )
                return admitted
            await asyncio.sleep(min(left, random.uniform(delay / 2, delay)))
            delay = min(delay * 2, MAX_POLL)

    # -- release and renewal -------------------------------------------------------------

    def give_back(self, lease: str, sets: tuple[str, ...]) -> None:
        """Off this worker's books now; the ZREM leaves on the keeper's next turn."""
        self._live.pop(lease, None)
        self._releases.append((lease, sets, time.monotonic() + self.lease_seconds))
        if self._wake is not None:
            self._wake.set()

    async def _keep(self) -> None:
        """Sends releases as they come and renews every live lease every third of a lease
        time; one task, so the two never overtake each other."""
        assert self._wake is not None
        wake = self._wake
        interval = self.lease_seconds / 3
        next_renewal = time.monotonic() + interval
        backoff = 0.05
        while True:
            wait = next_renewal - time.monotonic()
            if not self._releases and wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), wait)
            wake.clear()
            try:
                if self._releases:
                    await self._send_releases()
                if time.monotonic() >= next_renewal:
                    await self._renew_all()
                    next_renewal = time.monotonic() + interval
                backoff = 0.05
            except GatesUnavailable as exc:
                self._failed(exc)
                # Try again soon: once the store is back, leases are renewed (or put back)
                # well within a lease time.
                next_renewal = min(next_renewal, time.monotonic() + PROBE_INTERVAL)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, PROBE_INTERVAL)
            except Exception:  # a bug here must not stop renewals for the worker's life
                log.exception("lease keeper pass failed")
                await asyncio.sleep(PROBE_INTERVAL)

    async def _send_releases(self) -> None:
        batch, self._releases = self._releases, []
        now = time.monotonic()
        batch = [entry for entry in batch if entry[2] > now]  # older ones expired by now
        if not batch:
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for lease, sets, _ in batch:
                    for name in sets:
                        pipe.zrem(name, lease)
                await translated(pipe.execute())
        except GatesUnavailable:
            self._releases[:0] = batch  # first in line for the next try
            raise
        self._answered()

    async def _renew_all(self) -> None:
        live = list(self._live.items())
        if not live and self._down_since is None:
            return
        keys = self.keys
        head = [keys.generation, keys.epoch]
        if not live:
            await translated(self._client.ping())  # probe: is the store back?
            self._answered()
            return
        gone: list[str] = []
        entries = [(lease, name) for lease, sets in live for name in sets]
        for start in range(0, len(entries), RENEW_BATCH):
            chunk = entries[start : start + RENEW_BATCH]
            reply = await translated(
                self._renew(
                    keys=[*head, *(name for _, name in chunk)],
                    args=[self._recovery_ms, self._lease_ms, *(lease for lease, _ in chunk)],
                )
            )
            gone.extend(chunk[int(index) - 3][0] for index in reply)
        self._answered()
        lost = {lease for lease in gone if lease in self._live}
        if lost:
            self.leases_lost += len(lost)
            log.warning(
                "%d live leases were gone from the coordination store (it lost its data, "
                "or this worker stalled past the lease time); put back, the streams go on",
                len(lost),
                extra={"leases_lost_total": self.leases_lost},
            )

    # -- outages -------------------------------------------------------------------------

    def _guard(self) -> bool:
        """While the store is down, one real try per probe interval; the rest fail fast.
        Whether it was down."""
        if self._down_since is None:
            return False
        now = time.monotonic()
        if now - self._last_try < PROBE_INTERVAL:
            raise GatesUnavailable("the coordination store is unreachable")
        self._last_try = now
        return True

    def _failed(self, exc: Exception) -> None:
        if self._down_since is None:
            self._down_since = self._last_try = time.monotonic()
            log.error(
                "the coordination store (Redis) is unreachable: %s; refusing new requests "
                "with 503 until it answers (streams in flight go on)",
                exc,
            )

    def _answered(self) -> None:
        if self._down_since is not None:
            log.warning(
                "the coordination store (Redis) answers again after %.1f s of outage",
                time.monotonic() - self._down_since,
            )
            self._down_since = None
            # A change committed during the outage may not have been announced: every
            # cached credential is read again before it is trusted.
            self._known = ""

    def _saw(self, generation: str) -> None:
        """Move the known counter forward only (replies may arrive out of order)."""
        if not self._known or int(generation) > int(self._known):
            self._known = generation

    @property
    def live_leases(self) -> int:
        return len(self._live)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
