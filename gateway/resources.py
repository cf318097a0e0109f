"""What one worker process opens after the fork and closes on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import TYPE_CHECKING

from gateway.credentials import CredentialCache
from gateway.errors import CoordinationUnavailable, ServerFault
from gateway.heap import HeapTrimmer
from gateway.metrics.tally import WorkerMetrics
from gateway.proxy import COORDINATION_MESSAGE, ProxyRuntime
from gateway.settings import Settings
from gateway.upstream import Upstream
from ipc.caps import apply_cap, read_state
from ipc.errors import CredentialGone, GatesUnavailable
from ipc.gates import Gatekeeper
from ipc.ledger import Ledger
from ipc.queue import Queue
from storage.crypto import MasterKey, load_or_create_master_key_file
from storage.engine import bind_engine, close_engine, create_engine, open_engine
from storage.errors import MasterKeyError
from storage.repository import KeyChange

if TYPE_CHECKING:
    from ipc.redis_gates import RedisGatekeeper

log = logging.getLogger("gateway.resources")
# Announcing a committed change to the shared gates: tries, and the pause between them.
ANNOUNCE_TRIES = 5
ANNOUNCE_PAUSE = 0.2


def resolve_master_key(settings: Settings) -> MasterKey:
    """GATEWAY_MASTER_KEY, or for the zero-configuration SQLite default a key file
    (created by the launcher on first start, read by the workers)."""
    if settings.master_key is not None:
        return MasterKey.from_base64(settings.master_key.reveal())
    if not settings.is_sqlite:
        raise MasterKeyError(
            "GATEWAY_MASTER_KEY is required with PostgreSQL: generate one with "
            "`gateway keygen` and keep it safe"
        )
    key, created = load_or_create_master_key_file(settings.master_key_file)
    if created:
        log.warning(
            "created a new master key file %s (mode 0600): back it up",
            settings.master_key_file,
        )
    return key


class WorkerResources(ProxyRuntime):
    """Database engine, master key, ledger, gates, credential cache and upstream client."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.master_key: MasterKey | None = None
        self.worker_metrics: WorkerMetrics | None = None
        self.shared: RedisGatekeeper | None = None  # shared gates (Redis) instead of POSIX

    async def open(self) -> None:
        settings = self.settings
        self.engine = create_engine(settings.database_url)
        bind_engine(self.engine)
        await open_engine(self.engine)
        self.master_key = resolve_master_key(settings)
        if settings.gates_url is not None:
            # Imported only here: redis costs each worker ~7.5 MiB that POSIX gates never use.
            from ipc.redis_gates import RedisGatekeeper

            self.shared = RedisGatekeeper(
                settings.gates_url.reveal(),
                settings.gates_prefix,
                global_cap=settings.max_global_concurrent,
                lease_seconds=settings.lease_seconds,
            )
            await self.shared.open()
            self.credentials = CredentialCache(self.shared, self.master_key)
            # With the wait queue on, a request over a cap polls Redis (``admit_shared``).
            self.queue = None
        else:
            self.ledger = Ledger(settings.ipc_namespace)
            try:
                self.gatekeeper = Gatekeeper(
                    settings.ipc_namespace,
                    global_cap=settings.max_global_concurrent,
                    ledger=self.ledger,
                )
            except BaseException:
                self.ledger.close()
                raise
            self.credentials = CredentialCache(self.gatekeeper, self.master_key)
            self.queue = (
                Queue(
                    settings.ipc_namespace,
                    self.ledger,
                    max_waiters=settings.queue_max_waiters,
                )
                if settings.queue_timeout > 0
                else None
            )
        self.upstream = Upstream(settings)
        self._trimmer = asyncio.get_running_loop().create_task(
            HeapTrimmer(settings.heap_trim_interval).run()
        )
        if settings.metrics_dir is not None:
            self.worker_metrics = WorkerMetrics()
            self.metrics = self.worker_metrics.tally
            self.worker_metrics.start()

    async def close(self) -> None:
        self._trimmer.cancel()
        if self.worker_metrics is not None:
            await self.worker_metrics.stop()
        await self.upstream.aclose()
        if self.shared is not None:
            await self.shared.close()
        else:
            if self.queue is not None:
                self.queue.close()
            self.gatekeeper.close()
            self.ledger.close()
        await close_engine(self.engine)

    def require_master_key(self) -> MasterKey:
        if self.master_key is None:
            raise ServerFault("The gateway has no master key configured (GATEWAY_MASTER_KEY).")
        return self.master_key

    async def before_change(self) -> None:
        """Shared gates: refuse a change (nothing committed) while the store that must
        announce it to every host does not answer."""
        if self.shared is not None:
            try:
                await self.shared.ping()
            except GatesUnavailable as exc:
                log.error("settings change refused: the coordination store is unreachable: %s", exc)
                raise CoordinationUnavailable(
                    COORDINATION_MESSAGE,
                    headers={"retry-after": str(self.settings.retry_after_seconds)},
                ) from None

    async def key_changed(self, change: KeyChange) -> None:
        """After the commit: resize the credential's gate in place, then tell every worker.

        Resized before the answer goes out, so from the client's view the new cap holds
        from the moment its PUT returns; a later change applied first wins (by version).
        With shared gates the cap is pushed to Redis (by version) and Redis's change
        counter moved, so every worker on every host reloads on its next request.
        """
        if self.shared is not None:
            await self._announce_shared(change)
            return
        if change.current is not None:
            with contextlib.suppress(CredentialGone):  # its user was deleted meanwhile
                apply_cap(
                    self.settings.ipc_namespace,
                    change.user_id,
                    version=change.current.cap_version,
                    cap=change.current.max_concurrent,
                )
        self.gatekeeper.bump_generation()

    async def credential_in_use(self, user_id: uuid.UUID) -> int:
        """Requests in flight on the user's credential across all workers (0 before any
        request opened its gate): read from the gate itself, so requests admitted under an
        earlier cap count too. With shared gates: live leases of every host."""
        if self.shared is not None:
            try:
                return await self.shared.in_use(user_id)
            except GatesUnavailable:
                raise CoordinationUnavailable(
                    COORDINATION_MESSAGE,
                    headers={"retry-after": str(self.settings.retry_after_seconds)},
                ) from None
        state = read_state(self.settings.ipc_namespace, user_id)
        return 0 if state is None else state.in_use

    async def _announce_shared(self, change: KeyChange) -> None:
        assert self.shared is not None
        current = change.current
        cap = (
            None
            if current is None
            else (change.user_id, current.cap_version, current.max_concurrent)
        )
        for attempt in range(ANNOUNCE_TRIES):
            try:
                await self.shared.announce(cap=cap)
                return
            except GatesUnavailable as exc:
                if attempt == ANNOUNCE_TRIES - 1:
                    log.error(
                        "a committed change could not be announced to the other gateway "
                        "hosts (coordination store unreachable: %s)",
                        exc,
                        extra={"user_id": str(change.user_id)},
                    )
                    raise CoordinationUnavailable(
                        "The change was saved, but not yet announced to every gateway host "
                        "(the coordination store is unavailable); send it again shortly.",
                        headers={"retry-after": str(self.settings.retry_after_seconds)},
                    ) from None
                await asyncio.sleep(ANNOUNCE_PAUSE)
