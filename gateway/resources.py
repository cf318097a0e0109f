"""What one worker process opens after the fork and closes on shutdown."""

from __future__ import annotations

import asyncio
import logging
import uuid

from gateway.credentials import CredentialCache
from gateway.errors import ServerFault
from gateway.heap import HeapTrimmer
from gateway.proxy import ProxyRuntime
from gateway.settings import Settings
from gateway.upstream import Upstream
from ipc.gates import Gatekeeper
from ipc.ledger import Ledger
from storage import repository
from storage.crypto import MasterKey, load_or_create_master_key_file
from storage.engine import bind_engine, close_engine, create_engine, open_engine
from storage.errors import MasterKeyError
from storage.repository import KeyChange

log = logging.getLogger("gateway.resources")


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

    async def open(self) -> None:
        settings = self.settings
        self.engine = create_engine(settings.database_url)
        bind_engine(self.engine)
        await open_engine(self.engine)
        self.master_key = resolve_master_key(settings)
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
        self.upstream = Upstream(settings)
        self._trimmer = asyncio.get_running_loop().create_task(
            HeapTrimmer(settings.heap_trim_interval).run()
        )

    async def close(self) -> None:
        self._trimmer.cancel()
        await self.upstream.aclose()
        self.gatekeeper.close()
        self.ledger.close()
        await close_engine(self.engine)

    def require_master_key(self) -> MasterKey:
        if self.master_key is None:
            raise ServerFault("The gateway has no master key configured (GATEWAY_MASTER_KEY).")
        return self.master_key

    def key_changed(self, change: KeyChange) -> None:
        """After the commit: tell every worker, then retire the old semaphore name.

        Order matters: a worker that read the old row before our commit re-checks the
        counter after opening the old name, so the bump must land before the unlink.
        """
        self.gatekeeper.bump_generation()
        previous, current = change.previous, change.current
        if previous is not None and previous != current:
            self.gatekeeper.unlink_credential_gate(
                change.user_id, previous.cap_version, previous.max_concurrent
            )

    async def credential_in_use(self, user_id: uuid.UUID) -> int | None:
        """Requests in flight on the user's credential across all workers; None without a key.

        The settings API's one view of a credential's live permit count, kept behind this
        method so the count follows however the credential gates are built.
        """
        stored = await repository.get_credential(user_id)
        if stored is None:
            return None
        return self.gatekeeper.credential_in_use(user_id, stored.cap_version, stored.max_concurrent)
