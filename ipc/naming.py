"""Names of the POSIX semaphores and shared memory objects of one namespace.

Every name starts with ``/{namespace}.`` so a namespace's objects can be listed and
removed together, and two deployments (or two tests) never share one.

    /{ns}.gen              change counter (a semaphore used as a counter)
    /{ns}.g.{cap}          the global gate
    /{ns}.c.{user hex}     one credential's gate: its free permits (resized in place)
    /{ns}.d.{user hex}     that credential's debt: permits still to take back after a lowered cap
    /{ns}.k.{user hex}     that credential's cap record (shared memory; see ``ipc.caps``)
    /{ns}.l.{pid}          a worker's ledger (shared memory)
    /{ns}.repairs.{scope}  drift repairs the audit made since start (a semaphore as a counter)
    /{ns}.q.g              the global gate's waiting room (free places; ``ipc.queue``)
    /{ns}.q.{user hex}     a credential's waiting room
    {ns}.metrics/          the workers' Prometheus files (a folder in /dev/shm, see
                           ``gateway.metrics.folder``)

A credential's names carry its user id alone, never its cap: a cap change resizes the
same semaphore, so every request in flight, old and new, counts against one counter.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Final, Literal

import msgspec

from ipc.errors import InvalidName

# Linux allows NAME_MAX (255) minus the "sem." prefix glibc adds: 251 after the slash.
POSIX_NAME_MAX: Final = 251
NAMESPACE_MAX: Final = 48
SHM_DIR: Final = Path("/dev/shm")

_NAMESPACE_RE: Final = re.compile(rf"^[A-Za-z0-9_-]{{1,{NAMESPACE_MAX}}}$")


class GateName(msgspec.Struct, frozen=True):
    """What a gate's name says: the global gate carries its cap, a credential's its user."""

    name: str
    scope: Literal["global", "credential"]
    cap: int | None = None
    user_id: uuid.UUID | None = None


def validate_namespace(namespace: str) -> str:
    if not _NAMESPACE_RE.fullmatch(namespace):
        raise InvalidName(
            f"IPC namespace {namespace!r} must be 1..{NAMESPACE_MAX} characters of "
            "letters, digits, '_' or '-'"
        )
    return namespace


def _checked(name: str) -> str:
    if len(name) - 1 > POSIX_NAME_MAX or "/" in name[1:]:
        raise InvalidName(f"POSIX name {name!r} is too long or has an inner slash")
    return name


def generation_name(namespace: str) -> str:
    return _checked(f"/{namespace}.gen")


def global_gate_name(namespace: str, cap: int) -> str:
    return _checked(f"/{namespace}.g.{cap}")


def credential_gate_name(namespace: str, user_id: uuid.UUID) -> str:
    return _checked(f"/{namespace}.c.{user_id.hex}")


def credential_debt_name(namespace: str, user_id: uuid.UUID) -> str:
    return _checked(f"/{namespace}.d.{user_id.hex}")


def cap_record_name(namespace: str, user_id: uuid.UUID) -> str:
    return _checked(f"/{namespace}.k.{user_id.hex}")


def repairs_name(namespace: str, scope: str) -> str:
    return _checked(f"/{namespace}.repairs.{scope}")


def waiting_room_name(namespace: str, user_id: uuid.UUID | None) -> str:
    """The waiting room of a credential's gate, or of the global gate (``None``)."""
    return _checked(f"/{namespace}.q.{'g' if user_id is None else user_id.hex}")


def ledger_name(namespace: str, pid: int) -> str:
    return _checked(f"/{namespace}.l.{pid}")


def metrics_dir(namespace: str) -> Path:
    """The folder of the namespace's Prometheus multiprocess files: in /dev/shm, so the
    workers' mmap'd counters live in memory, and named for the namespace so that it is
    removed with it."""
    return SHM_DIR / f"{validate_namespace(namespace)}.metrics"


def lock_path(namespace: str) -> Path:
    return SHM_DIR / f"{namespace}.lock"


def parse_gate_name(name: str) -> GateName | None:
    """The scope and the cap or user a gate's name carries; None for other names."""
    parts = name.lstrip("/").split(".")
    if len(parts) != 3:
        return None
    try:
        if parts[1] == "g":
            return GateName(name=name, scope="global", cap=int(parts[2]))
        if parts[1] == "c" and len(parts[2]) == 32:
            return GateName(name=name, scope="credential", user_id=uuid.UUID(hex=parts[2]))
    except ValueError:
        return None
    return None


def list_semaphores(namespace: str) -> list[str]:
    """Names of the namespace's semaphores (Linux keeps them as /dev/shm/sem.NAME)."""
    prefix = f"sem.{namespace}."
    return sorted("/" + p.name[4:] for p in _shm_entries() if p.name.startswith(prefix))


def list_ledgers(namespace: str) -> list[str]:
    prefix = f"{namespace}.l."
    return sorted("/" + p.name for p in _shm_entries() if p.name.startswith(prefix))


def list_cap_records(namespace: str) -> list[tuple[uuid.UUID, str]]:
    """(user id, record name) of every credential whose cap record exists."""
    prefix = f"{namespace}.k."
    found = []
    for entry in _shm_entries():
        if entry.name.startswith(prefix):
            try:
                found.append((uuid.UUID(hex=entry.name[len(prefix) :]), "/" + entry.name))
            except ValueError:
                continue
    return sorted(found)


def list_lock_files() -> list[Path]:
    return sorted(p for p in _shm_entries() if p.name.endswith(".lock"))


def list_namespaces(prefix: str) -> list[str]:
    """Namespaces with a live change counter whose name starts with ``prefix``."""
    found = set()
    for entry in _shm_entries():
        if entry.name.startswith(f"sem.{prefix}") and entry.name.endswith(".gen"):
            found.add(entry.name[4:-4])
    return sorted(found)


def _shm_entries() -> list[Path]:
    try:
        return list(SHM_DIR.iterdir())
    except FileNotFoundError:
        return []
