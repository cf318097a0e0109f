"""Tokens' last-used times, written off the request path.

A request only adds its token's hash to a set (``CredentialCache.used``); every
``interval`` seconds each worker writes the set in one UPDATE, which skips tokens any
worker marked within the interval, so a token's row is written at most about once per
interval however busy it is.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from gateway.credentials import CredentialCache
from storage import repository
from storage.errors import StorageError

log = logging.getLogger("gateway.token_use")


class TokenUseRecorder:
    def __init__(self, credentials: CredentialCache, *, interval: float) -> None:
        self._credentials = credentials
        self._interval = interval

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()

    async def flush(self) -> None:
        used, self._credentials.used = self._credentials.used, set()
        if not used:
            return
        try:
            await repository.record_token_use(
                sorted(used), at=datetime.now(UTC), every=timedelta(seconds=self._interval)
            )
        except StorageError as exc:
            # A missed mark is harmless (the next use marks it again); never a failure.
            log.warning("could not record the last use of %d tokens: %s", len(used), exc)
