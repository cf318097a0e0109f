"""The launcher's claim on a namespace: an exclusive lock, a clean slate, the shared gates."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import uuid

import msgspec
import posix_ipc

from ipc.caps import mark_deleted, read_state
from ipc.errors import IpcError, NamespaceBusy
from ipc.gates import unlink_semaphore
from ipc.ledger import process_start_time, read_ledger, unlink_ledger
from ipc.naming import (
    SHM_DIR,
    credential_gate_name,
    generation_name,
    global_gate_name,
    list_cap_records,
    list_ledgers,
    list_lock_files,
    list_namespaces,
    list_semaphores,
    lock_path,
    metrics_dir,
    parse_gate_name,
    validate_namespace,
)

log = logging.getLogger("ipc.namespace")


class NamespaceClaim:
    """Held by ``gateway serve`` for its whole life; workers only open what it created."""

    def __init__(
        self, namespace: str, *, global_cap: int | None, tag: str = "", info: str = ""
    ) -> None:
        self.namespace = validate_namespace(namespace)
        self.global_cap = global_cap
        # Written into the lock file, so tools can find this namespace by what it serves
        # (the gateway tags it with its database) even when its name was set by hand;
        # ``info`` (one line, opaque here) tells them more: where its data lives.
        self.tag = tag
        self.info = info.replace("\n", " ")
        self._lock_fd: int | None = None

    def __enter__(self) -> NamespaceClaim:
        self.claim()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def claim(self) -> None:
        path = lock_path(self.namespace)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _read_pid(path)
            raise NamespaceBusy(
                f"IPC namespace {self.namespace!r} is held by another gateway launcher"
                + (f" (pid {holder})" if holder else "")
                + "; stop it first, or set GATEWAY_IPC_NAMESPACE to run a second gateway"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{self.tag}\n{self.info}\n".encode())
        self._lock_fd = fd
        stale = purge(self.namespace)
        if stale:
            log.info("removed %d stale IPC objects of namespace %s", stale, self.namespace)
        # O_CREX: after the purge these names must not exist; if one does, another
        # process is racing us on a namespace we hold, and we refuse rather than share.
        posix_ipc.Semaphore(
            generation_name(self.namespace), posix_ipc.O_CREX, mode=0o600, initial_value=0
        ).close()
        if self.global_cap is not None:
            posix_ipc.Semaphore(
                global_gate_name(self.namespace, self.global_cap),
                posix_ipc.O_CREX,
                mode=0o600,
                initial_value=self.global_cap,
            ).close()

    def release(self) -> None:
        if self._lock_fd is None:
            return
        purge(self.namespace)
        lock_path(self.namespace).unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = None


def purge(namespace: str) -> int:
    """Unlink every semaphore, cap record and ledger of the namespace, and remove its
    metrics folder; the count removed."""
    removed = 0
    for name in list_semaphores(namespace):
        removed += unlink_semaphore(name)
    for name in [*list_ledgers(namespace), *(record for _, record in list_cap_records(namespace))]:
        unlink_ledger(name)  # any shared memory object, by name
        removed += 1
    folder = metrics_dir(namespace)
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    return removed


def unlink_user_gates(namespace: str, user_id: uuid.UUID) -> None:
    """Retire a deleted user's gate: holders release onto it, nobody opens it again, and
    the launcher removes it once it is free (``ipc.caps.sweep_deleted``)."""
    mark_deleted(namespace, user_id)


def bump_generation(namespace: str) -> bool:
    """Tell every worker of a running namespace to drop its caches; False if none runs."""
    try:
        sem = posix_ipc.Semaphore(generation_name(namespace))
    except posix_ipc.ExistentialError:
        return False
    try:
        sem.release()
    finally:
        sem.close()
    return True


def bump_generations(prefix: str, *, explicit: str | None = None) -> list[str]:
    """Bump ``explicit``, every namespace whose name starts with ``prefix``, and every
    namespace whose launcher tagged it with ``prefix``."""
    return sorted(ns for ns in _candidates(prefix, explicit) if bump_generation(ns))


def running_namespaces(prefix: str, *, explicit: str | None = None) -> list[str]:
    """The namespaces among those ``bump_generations`` would reach whose launcher runs."""
    return sorted(ns for ns in _candidates(prefix, explicit) if launcher_pid(ns) is not None)


def launcher_pid(namespace: str) -> int | None:
    """The pid of the launcher holding ``namespace``; None when no launcher holds it."""
    try:
        validate_namespace(namespace)
        fd = os.open(lock_path(namespace), os.O_RDONLY)
    except (OSError, IpcError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(lock_path(namespace))
            return int(pid) if pid.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None  # a lock file left by a launcher that was killed
    finally:
        os.close(fd)


def _candidates(prefix: str, explicit: str | None) -> set[str]:
    names = set(list_namespaces(prefix)) | set(tagged_namespaces(prefix))
    if explicit:
        names.add(explicit)
    return names


class RunningLauncher(msgspec.Struct, frozen=True):
    """A namespace whose launcher is alive, with the info line it wrote at its claim."""

    namespace: str
    pid: int
    tag: str
    info: str


def running_launchers() -> list[RunningLauncher]:
    """Every namespace on this host whose launcher holds its lock now."""
    found = []
    for entry in list_lock_files():
        namespace = entry.name.removesuffix(".lock")
        pid = launcher_pid(namespace)
        if pid is None:
            continue
        try:
            lines = entry.read_text().splitlines()
        except OSError:
            continue
        found.append(
            RunningLauncher(
                namespace=namespace,
                pid=pid,
                tag=lines[1] if len(lines) > 1 else "",
                info=lines[2] if len(lines) > 2 else "",
            )
        )
    return found


def tagged_namespaces(tag: str) -> list[str]:
    """Namespaces whose launcher's lock file carries ``tag``."""
    found = []
    for entry in list_lock_files():
        try:
            lines = entry.read_text().splitlines()
        except OSError:
            continue
        if len(lines) >= 2 and lines[1] == tag:
            found.append(entry.name.removesuffix(".lock"))
    return sorted(found)


class GateUsage(msgspec.Struct, frozen=True):
    """One gate as it stands: for a credential, ``cap`` is the cap in force and
    ``to_drain`` the requests in flight above it (after a lowered cap)."""

    name: str
    scope: str
    user_id: str | None
    cap: int
    in_use: int
    free: int
    to_drain: int = 0


def usage(namespace: str) -> list[GateUsage]:
    """Every gate of a namespace with its cap, permits in use and free permits."""
    rows = []
    for name in list_semaphores(namespace):
        parsed = parse_gate_name(name)
        if parsed is None or parsed.scope != "global" or parsed.cap is None:
            continue
        try:
            sem = posix_ipc.Semaphore(name)
        except posix_ipc.ExistentialError:
            continue
        try:
            free = int(sem.value)
        finally:
            sem.close()
        rows.append(
            GateUsage(
                name=name,
                scope="global",
                user_id=None,
                cap=parsed.cap,
                in_use=parsed.cap - free,
                free=free,
            )
        )
    for user_id, _record in list_cap_records(namespace):
        state = read_state(namespace, user_id)
        if state is None:
            continue
        rows.append(
            GateUsage(
                name=credential_gate_name(namespace, user_id),
                scope="credential",
                user_id=str(user_id),
                cap=state.cap,
                in_use=state.in_use,
                free=max(0, state.cap - state.in_use),
                to_drain=state.to_drain,
            )
        )
    return rows


def live_workers(namespace: str) -> list[int]:
    """Pids of the workers whose ledger is open and whose process lives (the same one:
    pid and start time), for the launcher's ``gateway_workers`` gauge."""
    pids = []
    for ledger in list_ledgers(namespace):
        header = read_ledger(ledger, with_holdings=False)
        if header is not None and process_start_time(header.pid) == header.start_time:
            pids.append(header.pid)
    return sorted(pids)


def held_by_ledgers(namespace: str) -> dict[str, int]:
    """Permits per gate name that live workers' ledgers record (for checks and `caps`)."""
    totals: dict[str, int] = {}
    for ledger in list_ledgers(namespace):
        snapshot = read_ledger(ledger)
        if snapshot is None:
            continue
        for holding in snapshot.holdings:
            totals[holding.name] = totals.get(holding.name, 0) + holding.count
    return totals


def _read_pid(path: os.PathLike[str]) -> str:
    try:
        with open(path) as fh:
            return fh.readline().strip()
    except OSError:
        return ""


def waiting_by_scope(namespace: str, places: int) -> dict[str, int]:
    """Requests waiting in line now, across workers: the global gate's line, and every
    credential's together (``places`` per line; none counted when the queue is off)."""
    waiting = {"global": 0, "credential": 0}
    if places <= 0:
        return waiting
    prefix = f"sem.{namespace}.q."
    for entry in SHM_DIR.iterdir():
        if not entry.name.startswith(prefix):
            continue
        scope = "global" if entry.name == f"{prefix}g" else "credential"
        try:
            sem = posix_ipc.Semaphore("/" + entry.name[4:])
        except posix_ipc.ExistentialError:
            continue
        try:
            waiting[scope] += max(0, places - int(sem.value))
        finally:
            sem.close()
    return waiting
