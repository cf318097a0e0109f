"""The storage exception tree, and the one place where driver errors are translated into it.

    StorageError
    ├── StorageUnavailable        the database cannot be reached or opened, or is locked
    ├── IntegrityViolation        a constraint (unique, foreign key, check) refused a write
    │   ├── AlreadyExists         a user with that name exists already
    │   └── InvalidValue          a name or label breaks its rule (storage.names)
    └── CryptoError
        ├── MasterKeyError        the master key is missing or malformed
        └── DecryptionError       a stored key does not decrypt under this master key
            └── UnknownKeyId      ...because its master key is not in the keyring
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg


class StorageError(Exception):
    """Base of every error raised by the storage package."""


class StorageUnavailable(StorageError):
    """The database cannot be reached or opened, or stayed locked past the busy timeout."""


class IntegrityViolation(StorageError):
    """The database refused a write that breaks one of its constraints."""


class AlreadyExists(IntegrityViolation):
    """A row with that unique value exists already."""


class InvalidValue(IntegrityViolation):
    """A value breaks the rule the database enforces for it; the message names both."""


class CryptoError(StorageError):
    """Base of the errors of key encryption."""


class MasterKeyError(CryptoError):
    """The master key is missing or malformed."""


class DecryptionError(CryptoError):
    """A ciphertext does not decrypt (wrong master key, wrong user, or tampered)."""


class UnknownKeyId(DecryptionError):
    """A ciphertext names a master key id the keyring does not hold."""

    def __init__(self, message: str, *, key_id: str) -> None:
        super().__init__(message)
        self.key_id = key_id


# SQLite primary result codes that mean "the file cannot be used now", as opposed to a
# bad statement: busy/locked past the timeout, cannot open, I/O, disk full, not a database.
_SQLITE_UNAVAILABLE = frozenset(
    {
        sqlite3.SQLITE_PERM,
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_NOTADB,
    }
)
_SQLITE_UNIQUE = frozenset(
    {sqlite3.SQLITE_CONSTRAINT_UNIQUE, sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY}
)
# Postgres SQLSTATE classes for the same idea: connection exceptions, invalid
# authorization, insufficient resources, operator intervention (shutdown, cancel),
# unknown database; plus lock timeouts and serialization failures.
_PG_UNAVAILABLE_CLASSES = frozenset({"08", "28", "3D", "53", "57", "40"})
_PG_UNAVAILABLE_STATES = frozenset({"55P03"})


@contextmanager
def translate_errors(
    *, duplicate: type[IntegrityViolation] = IntegrityViolation
) -> Iterator[None]:
    """Re-raise driver errors (asyncpg, sqlite3, socket) as errors of this module.

    ``duplicate`` is the class raised for a unique violation, so a caller that knows
    which unique column it wrote can say ``AlreadyExists`` without catching twice.
    Usable around awaits: ``with translate_errors(): await query.run()``.
    """
    try:
        yield
    except sqlite3.Error as exc:
        raise _from_sqlite(exc, duplicate) from exc
    except asyncpg.PostgresError as exc:
        raise _from_postgres(exc, duplicate) from exc
    except asyncpg.InterfaceError as exc:
        # Client-side: pool closed, connection lost mid-query.
        raise StorageUnavailable(f"database connection failed: {exc}") from exc
    except OSError as exc:
        # Connection refused, DNS failure, connect timeout, a directory not creatable.
        raise StorageUnavailable(f"database unreachable: {exc}") from exc


def _from_sqlite(exc: sqlite3.Error, duplicate: type[IntegrityViolation]) -> StorageError:
    code: int = getattr(exc, "sqlite_errorcode", -1)
    if isinstance(exc, sqlite3.IntegrityError):
        cls = duplicate if code in _SQLITE_UNIQUE else IntegrityViolation
        return cls(str(exc))
    if code & 0xFF in _SQLITE_UNAVAILABLE:
        return StorageUnavailable(f"SQLite database unavailable: {exc}")
    return StorageError(f"SQLite error: {exc}")


def _from_postgres(
    exc: asyncpg.PostgresError, duplicate: type[IntegrityViolation]
) -> StorageError:
    state: str = getattr(exc, "sqlstate", None) or ""
    if isinstance(exc, asyncpg.UniqueViolationError):
        return duplicate(str(exc))
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return IntegrityViolation(str(exc))
    if state[:2] in _PG_UNAVAILABLE_CLASSES or state in _PG_UNAVAILABLE_STATES:
        return StorageUnavailable(f"PostgreSQL unavailable: {exc}")
    return StorageError(f"PostgreSQL error: {exc}")
