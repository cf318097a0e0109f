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
from gateway.token_use import TokenUseRecorder
from gateway.upstream import Upstream
from gateway.usage.recorder import UsageRecorder
from ipc.caps import apply_cap, read_state
from ipc.errors import CredentialGone, GatesUnavailable
from ipc.gates import Gatekeeper
from ipc.ledger import Ledger
from ipc.queue import Queue
from storage.engine import bind_engine, close_engine, create_engine, open_engine
from storage.errors import MasterKeyError
from storage.keyring import Keyring, KeyringSource, open_keyring_file
from storage.repository import KeyChange

if TYPE_CHECKING:
    from ipc.redis_gates import RedisGatekeeper

log = logging.getLogger("gateway.resources")
# Announcing a committed change to the shared gates: tries, and the pause between them.
ANNOUNCE_TRIES = 5
ANNOUNCE_PAUSE = 0.2


def resolve_keyring(settings: Settings, *, create: bool = True) -> KeyringSource:
    """GATEWAY_MASTER_KEY (fixed for the life of the process), or a keyring file that
    running workers read again when it changes: GATEWAY_MASTER_KEY_FILE, or for the
    zero-configuration SQLite default the data folder's ``master.key`` (created by the
    launcher on first start, read by the workers; ``create=False``: never created)."""
    if settings.master_key is not None:
        return KeyringSource(
            Keyring.parse(settings.master_key.reveal(), where="GATEWAY_MASTER_KEY")
        )
    if settings.master_key_path is None and not settings.is_sqlite:
        raise MasterKeyError(
            "GATEWAY_MASTER_KEY or GATEWAY_MASTER_KEY_FILE is required with PostgreSQL: "
            "generate a key with `gateway keygen` and keep it safe"
        )
    # A file named by GATEWAY_MASTER_KEY_FILE is never created: a typo in its path
    # would otherwise start a fresh key that decrypts nothing stored.
    source, created = open_keyring_file(
        settings.master_key_file, create=create and settings.master_key_path is None
    )
    if created:
        log.warning(
            "created a new master key file %s (mode 0600): back it up",
            settings.master_key_file,
        )
    return source


class WorkerResources(ProxyRuntime):
    """Database engine, master key, ledger, gates, credential cache and upstream client."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keyring: KeyringSource | None = None
        self.worker_metrics: WorkerMetrics | None = None
        self.usage_recorder: UsageRecorder | None = None
        self.shared: RedisGatekeeper | None = None  # shared gates (Redis) instead of POSIX

    async def open(self) -> None:
        settings = self.settings
        self.engine = create_engine(settings.database_url)
        bind_engine(self.engine)
        await open_engine(self.engine)
        self.keyring = resolve_keyring(settings)
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
            self.credentials = CredentialCache(self.shared, self.keyring)
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
            self.credentials = CredentialCache(self.gatekeeper, self.keyring)
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
        loop = asyncio.get_running_loop()
        self._trimmer = loop.create_task(HeapTrimmer(settings.heap_trim_interval).run())
        self._token_use = TokenUseRecorder(self.credentials, interval=settings.token_use_interval)
        self._token_use_task = loop.create_task(self._token_use.run())
        if settings.metrics_dir is not None:
            self.worker_metrics = WorkerMetrics()
            self.metrics = self.worker_metrics.tally
            self.worker_metrics.start()
        if settings.usage_flush_interval > 0:
            self.usage_recorder = UsageRecorder(
                interval=settings.usage_flush_interval,
                taken=None if self.metrics is None else self.metrics.tokens_from,
            )
            self.usage = self.usage_recorder.tally
            self.usage_recorder.start()

    async def close(self) -> None:
        self._trimmer.cancel()
        if self.usage_recorder is not None:
            await self.usage_recorder.stop()  # the database is still open: the last flush
        self._token_use_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._token_use_task
        await self._token_use.flush()
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

    def require_keyring(self) -> Keyring:
        """The keyring to encrypt with now (a key file changed on disk is read again)."""
        if self.keyring is None:
            raise ServerFault("The gateway has no master key configured (GATEWAY_MASTER_KEY).")
        return self.keyring.current()

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
