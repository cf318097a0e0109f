"""Names of the POSIX semaphores and shared memory objects of one namespace.

Every name starts with ``/{namespace}.`` so a namespace's objects can be listed and
removed together, and two deployments (or two tests) never share one.

    /{ns}.gen                                 change counter (a semaphore used as a counter)
    /{ns}.g.{cap}                             the global gate
    /{ns}.c.{user hex}.{cap version}.{cap}    one credential's gate at one cap version
    /{ns}.l.{pid}                             a worker's ledger (shared memory)
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
    name: str
    scope: Literal["global", "credential"]
    cap: int
    user_id: uuid.UUID | None = None
    cap_version: int | None = None


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


def credential_gate_name(namespace: str, user_id: uuid.UUID, cap_version: int, cap: int) -> str:
    return _checked(f"/{namespace}.c.{user_id.hex}.{cap_version}.{cap}")


def ledger_name(namespace: str, pid: int) -> str:
    return _checked(f"/{namespace}.l.{pid}")


def lock_path(namespace: str) -> Path:
    return SHM_DIR / f"{namespace}.lock"


def parse_gate_name(name: str) -> GateName | None:
    """The scope, user, cap version and cap a gate's name carries; None for other names."""
    parts = name.lstrip("/").split(".")
    try:
        if len(parts) == 3 and parts[1] == "g":
            return GateName(name=name, scope="global", cap=int(parts[2]))
        if len(parts) == 5 and parts[1] == "c":
            return GateName(
                name=name,
                scope="credential",
                cap=int(parts[4]),
                user_id=uuid.UUID(hex=parts[2]),
                cap_version=int(parts[3]),
            )
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
