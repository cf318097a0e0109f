"""`gateway caps --watch` against a real two-worker gateway: plain text, JSON lines, and a
terminal (a pseudo-terminal, as a person's shell gives it), each ended by Ctrl-C."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.caps_watch import RecentRejections
from tests.fixtures.gateway import ROOT, GatewayProcess, run_cli
from tests.gateway.test_caps import held_streams, one_request

pytestmark = pytest.mark.slow


class Watch:
    """``gateway caps --watch`` in a subprocess whose output is a pipe (not a terminal)."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "caps", "--watch", "--interval", "0.3", *args],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, check: Callable[[str], bool], timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for line in self.lines[seen:]:
                if check(line):
                    return line
            seen = len(self.lines)
            if self.process.poll() is not None and seen == len(self.lines):
                break
            time.sleep(0.05)
        raise AssertionError("no such line; the watch printed:\n" + "\n".join(self.lines[-40:]))

    def interrupt(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(15)
        self._reader.join(5)
        assert self.process.stderr is not None
        return code, self.process.stderr.read()


@pytest.fixture
def watching() -> Iterator[list[Watch]]:
    started: list[Watch] = []
    yield started
    for watch in started:
        if watch.process.poll() is None:
            watch.process.kill()
            watch.process.wait()


def cells(line: str) -> list[str]:
    return line.split()


async def test_plain_watch_refreshes_with_rejections_and_exits_0_on_ctrl_c(
    start_gateway: Callable[..., GatewayProcess], watching: list[Watch]
) -> None:
    gateway = start_gateway(workers=2, PROXY_MAX_GLOBAL_CONCURRENT="10")
    token, _ = gateway.user_with_key("alice", cap=1)
    gateway.user_with_key("bob", cap=5)
    watch = Watch(gateway.env)
    watching.append(watch)
    header = watch.wait_for_line(lambda line: line.startswith("scope"))
    assert cells(header)[:7] == ["scope", "user", "in", "use", "cap", "free", "to"]
    assert "rejected (last" in header
    async with held_streams(gateway, token, 1):
        statuses = [(await one_request(gateway, token)).status_code for _ in range(3)]
        assert statuses == [429] * 3
        # alice: 1 in use of 1, none free, 3 refused by her own cap; busiest first.
        row = watch.wait_for_line(
            lambda line: cells(line)[:2] == ["credential", "alice"] and cells(line)[-1] == "3"
        )
        assert cells(row) == ["credential", "alice", "1", "1", "0", "-", "3"]
        at = watch.lines.index(row)
        assert cells(watch.lines[at - 1])[0] == "global"  # the global row heads each table
        assert cells(watch.lines[at - 1])[2:4] == ["1", "10"]
        assert cells(watch.lines[at + 1])[:2] == ["credential", "bob"]
    code, errors = watch.interrupt()
    assert code == 0
    assert "Traceback" not in errors and "Aborted" not in errors


async def test_json_watch_prints_one_line_per_gate_and_refresh(
    start_gateway: Callable[..., GatewayProcess], watching: list[Watch]
) -> None:
    gateway = start_gateway(workers=2)  # no global cap
    token, _ = gateway.user_with_key("carol", cap=2)
    watch = Watch(gateway.env, "--json")
    watching.append(watch)
    # The watch counts from its first reading on: let it take one.
    watch.wait_for_line(lambda line: json.loads(line)["user"] == "carol")
    async with held_streams(gateway, token, 2):
        assert (await one_request(gateway, token)).status_code == 429

        def carol_refused(line: str) -> bool:
            row = json.loads(line)
            return row["user"] == "carol" and row["rejected_recently"] == 1

        row = json.loads(watch.wait_for_line(carol_refused))
        assert (row["in_use"], row["cap"], row["free"]) == (2, 2, 0)
        assert row["window_seconds"] > 0
        glob = json.loads(watch.wait_for_line(lambda line: json.loads(line)["scope"] == "global"))
        assert glob["cap"] is None  # no global cap: in use is what the ledgers hold
    code, _errors = watch.interrupt()
    assert code == 0


async def test_watch_on_a_terminal_redraws_in_place_and_ctrl_c_exits_0(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(workers=2, PROXY_MAX_GLOBAL_CONCURRENT="10")
    token, _ = gateway.user_with_key("dana", cap=1)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "caps", "--watch", "--interval", "0.3"],
        env={**gateway.env, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"},
        cwd=ROOT,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )
    os.close(slave)
    screen = bytearray()

    def read_for(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    screen.extend(os.read(master, 65536))
                except OSError:
                    return

    try:
        async with held_streams(gateway, token, 1):
            assert (await one_request(gateway, token)).status_code == 429
            read_for(4.0)
        text = screen.decode(errors="replace")
        assert "dana" in text and "rejected" in text and "Ctrl-C exits" in text
        # Redrawn in place: rich moves the cursor up over the last frame, not down a page.
        assert "\x1b[2K" in text or "\x1b[1A" in text
        assert text.count("gateway namespace") >= 3  # several refreshes
        os.write(master, b"\x03")  # Ctrl-C, through the terminal's line discipline
        code = process.wait(15)
        read_for(0.5)
        assert code == 0
        assert "Traceback" not in screen.decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)


def test_watch_with_no_running_gateway_fails_like_caps(tmp_path: Path, ipc_namespace: str) -> None:
    from tests.fixtures.gateway import base_env

    env = base_env(
        tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'g.sqlite3'}",
        namespace=ipc_namespace,
        upstream_url="http://127.0.0.1:9",
    )
    result = run_cli(env, "caps", "--watch", "--namespace", ipc_namespace, check=False)
    assert result.returncode == 1
    assert "no running gateway found" in result.stderr


def test_recent_rejections_cover_the_last_minute_and_survive_a_restart() -> None:
    window = RecentRejections(window=60.0)
    key = ("credential", "u1")
    assert window.add(0.0, {key: 5.0}) == ({}, 0.0)  # one reading: nothing to compare
    assert window.add(30.0, {key: 8.0}) == ({key: 3.0}, 30.0)
    assert window.add(61.0, {key: 9.0}) == ({key: 4.0}, 61.0)
    assert window.add(100.0, {key: 12.0}) == ({key: 4.0}, 70.0)  # 30..100: the 0..30 rise left
    # The gateway restarted: its counter began again below what was read before.
    assert window.add(110.0, {key: 2.0}) == ({key: 6.0}, 80.0)
    recent, _ = window.add(111.0, {key: 2.0, ("global", "u2"): 4.0})
    assert recent == {key: 6.0, ("global", "u2"): 4.0}  # a new series rose from 0
    assert window.add(112.0, {key: 10.0, ("global", "u2"): 4.0})[0][key] == 14.0
