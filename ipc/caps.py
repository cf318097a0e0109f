"""A credential's gate, resized in place: one semaphore, a debt, and a record of its cap.

Every credential has three objects, all named from its user id alone (``ipc.naming``):

    gate    a semaphore whose value is the free permits
    debt    a semaphore counting permits still to take back after the cap was lowered
    record  shared memory: (version, target cap, applied cap); its flock serialises resizes

They keep one invariant, whatever the order of requests, releases and resizes:

    free + held - debt == applied          (held: permits of requests in flight)

**Admission** takes a free permit; if any debt is owed, that permit pays one unit of it
instead and the request tries again. So a request is admitted only while
``held < applied``: a lowered cap counts every request still in flight, old and new, and
admits nothing until enough of them have ended. **Releases** just post the gate (the
proxy's hot path stays one semaphore call). **Raising** a cap cancels debt first, then frees
permits: the extra slots are there at once. **Lowering** takes free permits first, then
owes the rest as debt.

Changes are applied by version (the key row's ``cap_version``, which only grows): the
record keeps the highest version applied, so concurrent changes from any worker or the
command line converge on the last committed one. A resize moves ``applied`` one step at a
time towards ``target``, ordered so that a process killed mid-resize leaves the gate one
permit short, never one over (as the ledger does); the next resize, by anyone, resumes
from the record, and the launcher's audit gives a lost permit back.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import time
import uuid
from collections.abc import Iterator
from typing import Final

import msgspec
import posix_ipc

from ipc.errors import CredentialGone
from ipc.naming import (
    SHM_DIR,
    cap_record_name,
    credential_debt_name,
    credential_gate_name,
    list_cap_records,
)

_MAGIC: Final = b"GWCAP001"
# A deleted user's record: nobody opens the gate again (holders still release onto it);
# the launcher removes all three objects once no ledger holds a permit of it.
_DELETED: Final = b"GWCAPDEL"
_RECORD: Final = struct.Struct("<8sqqq")  # magic, version, target, applied
_APPLIED_AT: Final = struct.calcsize("<8sqq")
_APPLIED: Final = struct.Struct("<q")


class CapState(msgspec.Struct, frozen=True):
    """One credential's gate as read at one instant (not atomically across its parts)."""

    user_id: uuid.UUID
    version: int
    cap: int  # the target: the cap in force
    applied: int  # the cap the semaphores embody (equal to ``cap`` unless mid-resize)
    free: int
    debt: int

    @property
    def in_use(self) -> int:
        """Permits held by requests in flight (from the invariant above)."""
        return max(0, self.applied - self.free + self.debt)

    @property
    def to_drain(self) -> int:
        """Requests in flight above the cap: they must end before anything is admitted."""
        return max(0, self.in_use - self.cap)


class CredentialGate:
    """A worker's handles on one credential's gate, debt and record."""

    __slots__ = (
        "_debt",
        "_record",
        "_sem",
        "holders",
        "name",
        "namespace",
        "retired",
        "user_id",
        "version",
    )

    def __init__(
        self,
        namespace: str,
        user_id: uuid.UUID,
        sem: posix_ipc.Semaphore,
        debt: posix_ipc.Semaphore,
        record: mmap.mmap,
        version: int,
    ) -> None:
        self.namespace = namespace
        self.user_id = user_id
        self.name: str = sem.name
        self._sem = sem
        self._debt = debt
        self._record = record
        self.version = version  # the highest cap version this worker has seen applied
        self.holders = 0  # permits this worker holds on it
        self.retired = False  # closed once the last permit comes back

    def try_acquire(self) -> bool:
        sem, debt = self._sem, self._debt
        while True:
            try:
                sem.acquire(0)
            except posix_ipc.BusyError:
                return False
            if not debt.value:
                return True
            try:
                debt.acquire(0)
            except posix_ipc.BusyError:
                return True  # another process paid the debt first: the permit is ours
            # The permit paid one unit of a lowered cap's debt; try for another.

    def acquire_within(self, timeout: float) -> bool:
        """Blocking, for a waiting room's helper thread (the GIL is released while it
        waits): a permit within ``timeout`` seconds, paying any debt first."""
        sem, debt = self._sem, self._debt
        deadline = time.monotonic() + timeout
        while True:
            try:
                sem.acquire(max(0.0, deadline - time.monotonic()))
            except posix_ipc.BusyError:
                return False
            if not debt.value:
                return True
            try:
                debt.acquire(0)
            except posix_ipc.BusyError:
                return True

    def release(self) -> None:
        self._sem.release()

    @property
    def cap(self) -> int:
        """The cap in force (read from the record: a change elsewhere shows at once)."""
        return int(_RECORD.unpack_from(self._record)[2])

    @property
    def free(self) -> int:
        return int(self._sem.value)

    @property
    def deleted(self) -> bool:
        return bool(_RECORD.unpack_from(self._record)[0] == _DELETED)

    def state(self) -> CapState:
        return _state(self.user_id, self._record, self._sem, self._debt)

    def apply(self, version: int, cap: int) -> None:
        """Bring the gate to ``cap`` unless a later version is applied already."""
        if version <= self.version:
            return
        with _locked_record(self.namespace, self.user_id) as record:
            self.version = _apply(record, self._sem, self._debt, version, cap)

    def close(self) -> None:
        self._sem.close()
        self._debt.close()
        self._record.close()


def open_credential_gate(
    namespace: str, user_id: uuid.UUID, *, version: int, cap: int
) -> CredentialGate:
    """Open a credential's gate (creating it with ``cap`` on first use), brought to
    ``(version, cap)`` unless a later version is applied already."""
    with _locked_record(namespace, user_id) as record:
        sem, debt = _open_semaphores(namespace, user_id, record, cap)
        try:
            applied_version = _apply(record, sem, debt, version, cap)
            view = _map_record(namespace, user_id)
        except BaseException:
            sem.close()
            debt.close()
            raise
    return CredentialGate(namespace, user_id, sem, debt, view, applied_version)


def apply_cap(
    namespace: str, user_id: uuid.UUID, *, version: int, cap: int, create: bool = True
) -> None:
    """Apply a committed cap change from any process (a worker, the command line, the
    launcher); a no-op when a later version is applied already. With ``create=False``
    (the command line, the launcher) a gate no request has opened yet is left to the
    first worker that opens it, from the stored row: its objects belong to the workers'
    user."""
    with _locked_existing(namespace, user_id, create=create) as record:
        if record is None or (not create and _RECORD.unpack_from(record)[0] != _MAGIC):
            return
        sem, debt = _open_semaphores(namespace, user_id, record, cap)
        try:
            _apply(record, sem, debt, version, cap)
        finally:
            sem.close()
            debt.close()


def resume_resize(namespace: str, user_id: uuid.UUID) -> bool:
    """Finish a resize a killed process left half-done; whether there was one."""
    with _locked_existing(namespace, user_id) as record:
        if record is None:
            return False
        magic, _version, target, applied = _RECORD.unpack_from(record)
        if magic != _MAGIC or target == applied:
            return False
        sem, debt = _open_semaphores(namespace, user_id, record, target)
        try:
            _step(record, sem, debt, target)
        finally:
            sem.close()
            debt.close()
        return True


def read_state(namespace: str, user_id: uuid.UUID) -> CapState | None:
    """A credential's gate as it stands; None when no request has opened it yet."""
    try:
        view = _map_record(namespace, user_id)
    except posix_ipc.ExistentialError:
        return None
    try:
        if _RECORD.unpack_from(view)[0] != _MAGIC:
            return None
        try:
            sem = posix_ipc.Semaphore(credential_gate_name(namespace, user_id))
        except posix_ipc.ExistentialError:
            return None
        try:
            try:
                debt = posix_ipc.Semaphore(credential_debt_name(namespace, user_id))
            except posix_ipc.ExistentialError:
                return None
            try:
                return _state(user_id, view, sem, debt)
            finally:
                debt.close()
        finally:
            sem.close()
    finally:
        view.close()


def repair_credential(namespace: str, user_id: uuid.UUID, version: int, drift: int) -> bool:
    """Give back ``drift`` lost permits (or take back ``-drift`` extra ones, owing what is
    handed out already), unless the gate was resized since ``version`` was read: False
    then, and nothing is done."""
    with _locked_existing(namespace, user_id) as record:
        if record is None:
            return False
        magic, current, target, applied = _RECORD.unpack_from(record)
        if magic != _MAGIC or current != version or target != applied:
            return False
        sem, debt = _open_semaphores(namespace, user_id, record, target)
        try:
            for _ in range(drift):
                try:
                    debt.acquire(0)
                except posix_ipc.BusyError:
                    sem.release()
            for _ in range(-drift):
                try:
                    sem.acquire(0)
                except posix_ipc.BusyError:
                    debt.release()
        finally:
            sem.close()
            debt.close()
        return True


class GateView:
    """Read-only handles on an existing credential gate, kept open across the audit's
    passes: no lock taken, nothing created."""

    __slots__ = ("_debt", "_record", "_sem", "inode")

    def __init__(
        self,
        sem: posix_ipc.Semaphore,
        debt: posix_ipc.Semaphore,
        record: mmap.mmap,
        inode: int,
    ) -> None:
        self._sem = sem
        self._debt = debt
        self._record = record
        self.inode = inode

    @classmethod
    def open(cls, namespace: str, user_id: uuid.UUID, inode: int) -> GateView | None:
        try:
            record = _map_record(namespace, user_id)
        except posix_ipc.ExistentialError:
            return None
        try:
            sem = posix_ipc.Semaphore(credential_gate_name(namespace, user_id))
        except posix_ipc.ExistentialError:
            record.close()
            return None
        try:
            debt = posix_ipc.Semaphore(credential_debt_name(namespace, user_id))
        except posix_ipc.ExistentialError:
            sem.close()
            record.close()
            return None
        return cls(sem, debt, record, inode)

    def read(self) -> tuple[int, int, int, int, int] | None:
        """(version, cap, applied, free, debt); None for a deleted or unfinished record."""
        magic, version, target, applied = _RECORD.unpack_from(self._record)
        if magic != _MAGIC:
            return None
        return version, target, applied, int(self._sem.value), int(self._debt.value)

    def close(self) -> None:
        self._sem.close()
        self._debt.close()
        self._record.close()


class CapRecord(msgspec.Struct, frozen=True):
    version: int
    cap: int
    applied: int


def read_records(namespace: str) -> dict[uuid.UUID, CapRecord]:
    """Every credential's cap record, read without locks (a resize may be under way)."""
    records = {}
    for user_id, name in list_cap_records(namespace):
        try:
            data = (SHM_DIR / name.lstrip("/")).read_bytes()[: _RECORD.size]
        except OSError:
            continue
        if len(data) == _RECORD.size:
            magic, version, target, applied = _RECORD.unpack(data)
            if magic == _MAGIC:
                records[user_id] = CapRecord(version=version, cap=target, applied=applied)
    return records


def mark_deleted(namespace: str, user_id: uuid.UUID) -> None:
    """A deleted user's gate: never opened again; its holders still release onto it, and
    the launcher removes it once none is left (``sweep_deleted``). Unlinking it at once
    would let a worker holding a row read before the delete create a second counter under
    the same name."""
    with _locked_existing(namespace, user_id) as record:
        if record is not None and _RECORD.unpack_from(record)[0] == _MAGIC:
            _RECORD.pack_into(record, 0, _DELETED, *_RECORD.unpack_from(record)[1:])
            return
        if record is None:
            _unlink_semaphores(namespace, user_id)  # strays of a creator killed early


def has_deleted(namespace: str) -> bool:
    """Whether any deleted user's record is still there (a cheap look before a sweep)."""
    for _user_id, name in list_cap_records(namespace):
        try:
            if (SHM_DIR / name.lstrip("/")).read_bytes()[:8] == _DELETED:
                return True
        except OSError:
            continue
    return False


def sweep_deleted(namespace: str, held: dict[str, int]) -> int:
    """Remove the objects of deleted users whose gate no live ledger holds (``held``: the
    permits per gate name the live workers' ledgers record); the number removed."""
    removed = 0
    for user_id, name in list_cap_records(namespace):
        try:
            magic = (SHM_DIR / name.lstrip("/")).read_bytes()[:8]
        except OSError:
            continue
        if magic != _DELETED or held.get(credential_gate_name(namespace, user_id), 0):
            continue
        with _locked_existing(namespace, user_id) as record:
            if record is None or _RECORD.unpack_from(record)[0] != _DELETED:
                continue
            _unlink_semaphores(namespace, user_id)
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_shared_memory(name)
            removed += 1
    return removed


def _unlink_semaphores(namespace: str, user_id: uuid.UUID) -> None:
    for sem_name in (
        credential_gate_name(namespace, user_id),
        credential_debt_name(namespace, user_id),
    ):
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_semaphore(sem_name)


# -------------------------------------------------------------------------------- inside


@contextlib.contextmanager
def _locked_record(namespace: str, user_id: uuid.UUID) -> Iterator[mmap.mmap]:
    """The record (created if new) mapped under its exclusive flock: held for microseconds
    (a resize is a few semaphore calls); the kernel drops the lock of a process that dies
    holding it."""
    with _locked_existing(namespace, user_id, create=True) as record:
        assert record is not None
        yield record


@contextlib.contextmanager
def _locked_existing(
    namespace: str, user_id: uuid.UUID, *, create: bool = False
) -> Iterator[mmap.mmap | None]:
    name = cap_record_name(namespace, user_id)
    while True:
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREAT if create else 0, mode=0o600)
        except posix_ipc.ExistentialError:
            yield None
            return
        fcntl.flock(shm.fd, fcntl.LOCK_EX)
        # The record may have been unlinked (a deleted user) while we waited for its
        # lock: a lock on a name that now means another inode, or none, excludes no one.
        try:
            current = (SHM_DIR / name.lstrip("/")).stat().st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(shm.fd).st_ino:
            break
        shm.close_fd()
        if not create:
            yield None
            return
    try:
        if shm.size < _RECORD.size:
            os.ftruncate(shm.fd, _RECORD.size)  # a new record: all zeros, no magic yet
        with mmap.mmap(shm.fd, _RECORD.size) as view:
            yield view
    finally:
        shm.close_fd()  # also drops the lock


def _map_record(namespace: str, user_id: uuid.UUID) -> mmap.mmap:
    shm = posix_ipc.SharedMemory(cap_record_name(namespace, user_id))
    try:
        if shm.size < _RECORD.size:
            raise posix_ipc.ExistentialError("cap record not initialised")
        return mmap.mmap(shm.fd, _RECORD.size)
    finally:
        shm.close_fd()


def _open_semaphores(
    namespace: str, user_id: uuid.UUID, record: mmap.mmap, cap: int
) -> tuple[posix_ipc.Semaphore, posix_ipc.Semaphore]:
    """Under the record's lock: the gate and debt semaphores, created with the record when
    it is new (the gate full at ``cap``). ``CredentialGone`` for a deleted user's."""
    magic = _RECORD.unpack_from(record)[0]
    if magic == _DELETED:
        raise CredentialGone(f"the gate of user {user_id} was removed (the user was deleted)")
    fresh = magic != _MAGIC
    gate_name = credential_gate_name(namespace, user_id)
    debt_name = credential_debt_name(namespace, user_id)
    if fresh:
        # A creator killed before the magic may have left either semaphore, holding the
        # count of another cap; no one can hold permits on it (only a record with its
        # magic hands the gate out), so start both afresh.
        for name in (gate_name, debt_name):
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_semaphore(name)
        flags = posix_ipc.O_CREX
    else:
        flags = 0
    try:
        sem = posix_ipc.Semaphore(gate_name, flags, mode=0o600, initial_value=cap if fresh else 0)
    except posix_ipc.ExistentialError:
        raise CredentialGone(f"the gate of user {user_id} is gone") from None
    try:
        debt = posix_ipc.Semaphore(debt_name, flags, mode=0o600, initial_value=0)
    except posix_ipc.ExistentialError:
        sem.close()
        raise CredentialGone(f"the gate of user {user_id} is gone") from None
    except BaseException:
        sem.close()
        raise
    if fresh:
        # Written last: until the magic is there, the next opener creates afresh.
        _RECORD.pack_into(record, 0, _MAGIC, 0, cap, cap)
    return sem, debt


def _apply(
    record: mmap.mmap,
    sem: posix_ipc.Semaphore,
    debt: posix_ipc.Semaphore,
    version: int,
    cap: int,
) -> int:
    """Under the lock: record ``(version, cap)`` as the target if it is newer, then step the
    semaphores to the target (also finishing a resize a killed process left). Returns the
    version now in force."""
    _magic, applied_version, target, applied = _RECORD.unpack_from(record)
    if version > applied_version:
        applied_version, target = version, cap
        _RECORD.pack_into(record, 0, _MAGIC, applied_version, target, applied)
    if applied != target:
        _step(record, sem, debt, target)
    return int(applied_version)


def _step(
    record: mmap.mmap, sem: posix_ipc.Semaphore, debt: posix_ipc.Semaphore, target: int
) -> None:
    (applied,) = _APPLIED.unpack_from(record, _APPLIED_AT)
    while applied > target:
        # Take a permit out of circulation first, then record it: a kill in between
        # leaves one permit too few (the audit restores it), never one too many.
        try:
            sem.acquire(0)
        except posix_ipc.BusyError:
            debt.release()  # every permit is held: the next one released pays this
        applied -= 1
        _APPLIED.pack_into(record, _APPLIED_AT, applied)
    while applied < target:
        # Record first, then add the permit: a kill in between errs the same way.
        applied += 1
        _APPLIED.pack_into(record, _APPLIED_AT, applied)
        try:
            debt.acquire(0)  # a debt still owed is simply forgiven
        except posix_ipc.BusyError:
            sem.release()


def _state(
    user_id: uuid.UUID, record: mmap.mmap, sem: posix_ipc.Semaphore, debt: posix_ipc.Semaphore
) -> CapState:
    _magic, version, target, applied = _RECORD.unpack_from(record)
    return CapState(
        user_id=user_id,
        version=version,
        cap=target,
        applied=applied,
        free=int(sem.value),
        debt=int(debt.value),
    )
