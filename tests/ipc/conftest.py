"""Real parts for the ipc tests: a claimed namespace, in-process gatekeepers, other processes."""

from __future__ import annotations

import json
import mmap
import os
import selectors
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import posix_ipc
import pytest

from ipc import ledger as ledger_module
from ipc.gates import Gatekeeper
from ipc.ledger import Ledger
from ipc.namespace import NamespaceClaim
from ipc.naming import ledger_name

ROOT = Path(__file__).resolve().parents[2]
GLOBAL_CAP = 8
REPLY_TIMEOUT = 15.0


class OtherProcess:
    """``tests/ipc/_worker.py`` in its own process: a worker or a launcher, driven by JSON lines."""

    def __init__(self, role: str, namespace: str, global_cap: int | None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.ipc._worker", role, namespace, str(global_cap).lower()],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        ready = self._read()
        assert ready == {"ready": self.process.pid}, ready

    @property
    def pid(self) -> int:
        return self.process.pid

    def request(self, op: str, **args: Any) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def admit(self, user: uuid.UUID, version: int, cap: int) -> dict[str, Any]:
        result: dict[str, Any] = self.request("admit", user=user.hex, version=version, cap=cap)
        return result

    def exit(self) -> int:
        """Ask it to release everything and stop; its exit code."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": "exit"}) + "\n")
        self.process.stdin.flush()
        return self.process.wait(REPLY_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL and reap it (after this its pid is gone, not a zombie)."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(REPLY_TIMEOUT)

    def stop(self) -> None:
        self.kill()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()

    def _read(self) -> Any:
        assert self.process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(REPLY_TIMEOUT):
                self.kill()
                raise AssertionError(f"no reply from pid {self.pid} in {REPLY_TIMEOUT}s")
        line = self.process.stdout.readline()
        if not line:
            self.kill()
            assert self.process.stderr is not None
            raise AssertionError(f"pid {self.pid} exited:\n{self.process.stderr.read()}")
        return json.loads(line)


@pytest.fixture
def spawn(ipc_namespace: str) -> Iterator[Callable[..., OtherProcess]]:
    """Start stand-in workers (or launchers) on the test's namespace; all killed afterwards."""
    started: list[OtherProcess] = []

    def _spawn(role: str = "worker", *, global_cap: int | None = GLOBAL_CAP) -> OtherProcess:
        other = OtherProcess(role, ipc_namespace, global_cap)
        started.append(other)
        return other

    yield _spawn
    for other in started:
        other.stop()


@pytest.fixture
def claim(ipc_namespace: str) -> Iterator[NamespaceClaim]:
    with NamespaceClaim(ipc_namespace, global_cap=GLOBAL_CAP) as held:
        yield held


@pytest.fixture
def gatekeeper(claim: NamespaceClaim) -> Iterator[Gatekeeper]:
    """This process as one worker: its ledger and gatekeeper on the claimed namespace."""
    ledger = Ledger(claim.namespace, slots=64)
    keeper = Gatekeeper(claim.namespace, global_cap=GLOBAL_CAP, ledger=ledger)
    yield keeper
    keeper.close()
    ledger.close()


def sem_value(name: str) -> int:
    sem = posix_ipc.Semaphore(name)
    try:
        return int(sem.value)
    finally:
        sem.close()


def take(name: str, count: int) -> None:
    """Take ``count`` permits by hand, as a process that then dies without a trace would."""
    sem = posix_ipc.Semaphore(name)
    try:
        for _ in range(count):
            sem.acquire(0)
    finally:
        sem.close()


def forge_ledger(
    namespace: str, *, pid: int, start_time: int, holdings: dict[str, int], slots: int = 8
) -> str:
    """Write a ledger by hand with the module's own layout; its name."""
    name = ledger_name(namespace, pid)
    header, count = ledger_module._HEADER, ledger_module._COUNT
    name_bytes, slot_bytes = ledger_module._NAME_BYTES, ledger_module._SLOT_BYTES
    size = header.size + slots * slot_bytes
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREAT, mode=0o600, size=size)
    try:
        with mmap.mmap(shm.fd, size) as view:
            view[:] = bytes(size)
            header.pack_into(view, 0, ledger_module._MAGIC, pid, start_time, slots)
            for slot, (gate, held) in enumerate(holdings.items()):
                offset = header.size + slot * slot_bytes
                count.pack_into(view, offset, held)
                view[offset + ledger_module._NAME_AT : offset + slot_bytes] = gate.encode().ljust(
                    name_bytes, b"\0"
                )
    finally:
        shm.close_fd()
    return name


def wait_for(condition: Callable[[], bool], *, timeout: float) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()
