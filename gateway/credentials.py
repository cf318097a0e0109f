"""Per-worker cache of who a gateway token is: user, decrypted key, and credential gate.

Steps 2-4 of a proxied request (token -> user -> key -> gate) are served from here and
read from the database only on a miss. A change made anywhere (a settings PUT or DELETE
in another worker, a token revoked from the command line) bumps the namespace's change
counter; every request compares it before trusting the cache, so every worker sees the
change on its next request.

With shared gates (Redis) the counter lives in Redis and comes back with each admission:
every cached credential carries the counter it was read under, and an admission with an
older one is answered ``Stale`` (nothing taken). ``admit_shared`` then reads the
credential again (the counter it now knows was learned before that read, so the read sees
every change counted) and admits again: a credential cached before a revocation committed
on any host is never trusted.
"""

from __future__ import annotations

import logging
import time
import types
import uuid
from typing import TYPE_CHECKING

from gateway.errors import AuthenticationFailed, ServerFault, StorageUnavailableError
from ipc.caps import CredentialGate
from ipc.errors import CredentialGone, GatesUnavailable
from ipc.gates import Gatekeeper, Permit, Rejected
from storage import repository
from storage.errors import DecryptionError, StorageError, UnknownKeyId
from storage.keyring import KeyringSource
from storage.tokens import hash_token

if TYPE_CHECKING:
    from ipc.redis_gates import LeaseGate, RedisGatekeeper

log = logging.getLogger("gateway.credentials")

NO_KEY_MESSAGE = (
    "No Anthropic API key is configured for this gateway user. Set one with "
    'PUT /api/v1/me/anthropic-key {"key": "sk-ant-..."}.'
)
INVALID_TOKEN_MESSAGE = "Invalid, unknown, expired or revoked gateway token."
# Reloads in a row before an admission gives up: each follows a change committed anywhere.
MAX_RELOADS = 4


class ResolvedCredential:
    __slots__ = ("api_key", "expires_at", "gate", "user_id")

    def __init__(
        self,
        user_id: uuid.UUID,
        api_key: str,
        gate: CredentialGate | LeaseGate,
        expires_at: float | None = None,
    ) -> None:
        self.user_id = user_id
        self.api_key = api_key
        self.gate = gate
        self.expires_at = expires_at  # epoch seconds; None: the token never expires


class CredentialCache:
    def __init__(
        self,
        gatekeeper: Gatekeeper | RedisGatekeeper,
        keyring: KeyringSource | None,
        *,
        max_entries: int = 10_000,
    ) -> None:
        self._gatekeeper = gatekeeper
        self._keyring = keyring
        self._max_entries = max_entries
        self._entries: dict[str, ResolvedCredential] = {}
        self._generation = gatekeeper.generation()
        # Hashes of the tokens used since the last flush: a set add per request; the
        # worker writes them as last-used times off the request path (``TokenUseRecorder``).
        self.used: set[str] = set()
        # With shared gates, their module (imported only then: redis costs each worker
        # ~11 MiB), kept here so admit_shared does no import per request.
        self._shared_gates: types.ModuleType | None = None
        if not isinstance(gatekeeper, Gatekeeper):
            from ipc import redis_gates

            self._shared_gates = redis_gates

    def _sync(self) -> int | str:
        generation = self._gatekeeper.generation()
        if generation != self._generation:
            self._entries.clear()
            self._gatekeeper.drop_deleted_gates()
            self._generation = generation
        return generation

    async def resolve(self, token: str) -> ResolvedCredential:
        self._sync()
        token_hash = hash_token(token)
        entry = self._entries.get(token_hash)
        if entry is None:
            entry = await self._load(token_hash)
        elif entry.expires_at is not None and entry.expires_at <= time.time():
            del self._entries[token_hash]
            raise AuthenticationFailed(INVALID_TOKEN_MESSAGE)
        self.used.add(token_hash)
        return entry

    async def admit_shared(
        self, token: str, credential: ResolvedCredential, *, within: float = 0.0
    ) -> tuple[ResolvedCredential, Permit | Rejected]:
        """Shared gates: admit ``credential`` (waiting up to ``within`` seconds for a slot,
        with the wait queue on), reading it again first whenever a change was committed
        anywhere since it was read; the credential admitted (maybe a newer reading: another
        key, or a refusal if its token was revoked) and the answer."""
        shared = self._shared_gates
        assert shared is not None
        gates = self._gatekeeper
        assert isinstance(gates, shared.RedisGatekeeper)
        for _ in range(MAX_RELOADS):
            gate = credential.gate
            assert isinstance(gate, shared.LeaseGate)
            admitted = await (
                gates.admit_waiting(gate, within=within) if within > 0 else gates.admit(gate)
            )
            if not isinstance(admitted, shared.Stale):
                return credential, admitted
            credential = await self.resolve(token)
        raise GatesUnavailable("changes kept landing while the credential was read")

    async def _load(self, token_hash: str) -> ResolvedCredential:
        while True:
            before = self._sync()
            try:
                found = await repository.lookup_token(token_hash)
            except StorageError as exc:
                log.error("credential lookup failed: %s", exc)
                raise StorageUnavailableError(
                    "The gateway's database is unavailable; retry shortly."
                ) from exc
            if found is None:
                raise AuthenticationFailed(INVALID_TOKEN_MESSAGE)
            stored = found.credential
            if stored is None:
                raise AuthenticationFailed(NO_KEY_MESSAGE)
            api_key = self._decrypt(stored, found.user_id)
            # Brings the shared gate to the row's cap if no later change is applied yet
            # (a change whose worker died before applying it is applied here).
            try:
                gate = self._gatekeeper.credential_gate(
                    found.user_id, stored.cap_version, stored.max_concurrent
                )
            except CredentialGone:
                # Deleted after our read: its token is gone with it.
                raise AuthenticationFailed(INVALID_TOKEN_MESSAGE) from None
            if self._gatekeeper.generation() == before:
                # No change landed between our read and now: the row may be cached.
                entry = ResolvedCredential(found.user_id, api_key, gate, found.expires_at)
                if len(self._entries) >= self._max_entries:
                    del self._entries[next(iter(self._entries))]
                self._entries[token_hash] = entry
                return entry

    def _decrypt(self, stored: repository.Credential, user_id: uuid.UUID) -> str:
        """The key in clear. The keyring is taken afresh first (one ``stat`` of a key
        file, read again when it changed), so a key id met for the first time during a
        rotation is found in a key added to the file since this worker started; a key id
        the file does not hold either is a 500 that names it."""
        if self._keyring is None:
            raise ServerFault("The gateway has no master key configured (GATEWAY_MASTER_KEY).")
        keyring = self._keyring.current()
        try:
            return keyring.decrypt(
                stored.ciphertext, stored.nonce, key_id=stored.key_id, user_id=user_id
            )
        except UnknownKeyId as exc:
            log.error(
                "stored Anthropic key of user %s is under master key id %s, which the "
                "keyring does not hold (held: %s)",
                user_id,
                exc.key_id,
                ", ".join(keyring.key_ids),
            )
            raise ServerFault(
                "The stored Anthropic key could not be decrypted: it was encrypted under a "
                f"master key this gateway does not hold (key id {exc.key_id}). Ask an "
                "operator, or store the key again."
            ) from None
        except DecryptionError:
            log.error("stored Anthropic key of user %s failed to decrypt", user_id)
            raise ServerFault(
                "The stored Anthropic key could not be decrypted (wrong master key?). "
                "Ask an operator, or store the key again."
            ) from None
