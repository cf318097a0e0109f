"""The access log written without ``logging``: its shape, its writes, and its last lines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from pathlib import Path

import httpx
import pytest

from gateway.access_log import PIPE_BUF, AccessLog
from gateway.logs import JsonFormatter
from tests.fixtures.gateway import launch

FIELDS = {"user_id", "method", "path", "status", "duration_ms", "bytes", "outcome"}


def read_all(fd: int) -> bytes:
    out = b""
    while chunk := os.read(fd, 65536):
        out += chunk
    return out


def test_a_line_has_the_shape_of_every_other_log_line() -> None:
    import logging

    record = logging.LogRecord("gateway.access", logging.INFO, "", 0, "proxied", None, None)
    for key, value in dict(
        user_id="u1", method="POST", path="/v1/messages", status=200,
        duration_ms=1.5, bytes=10, outcome="ok", waited_ms=2.0,
    ).items():  # fmt: skip
        setattr(record, key, value)
    expected = json.loads(JsonFormatter().format(record))

    read, write = os.pipe()
    log = AccessLog(fd=write)
    log.line("POST", "/v1/messages", "u1", 200, 0.0015, 10, "ok", waited=0.002)
    log.line("GET", "/v1/models", None, 401, 0.0001, 0, "auth_failed")
    log.flush()
    os.close(write)
    first, second = (json.loads(line) for line in read_all(read).splitlines())
    os.close(read)
    assert list(first) == list(expected)  # same keys, same order
    assert {k: v for k, v in first.items() if k not in ("ts", "pid")} == {
        k: v for k, v in expected.items() if k not in ("ts", "pid")
    }
    assert first["ts"].endswith("Z") and len(first["ts"]) == len(expected["ts"])
    assert "waited_ms" not in second and second["user_id"] is None


def test_writes_are_whole_lines_no_longer_than_pipe_buf() -> None:
    """Several workers share one stderr pipe: a write of at most PIPE_BUF bytes is never
    split by the kernel, so lines of different workers never mix."""
    read, write = os.pipe()
    writes: list[bytes] = []
    log = AccessLog(fd=write)
    real = log._write

    def spy(data: bytes) -> int:
        writes.append(data)
        return real(data)

    log._write = spy  # type: ignore[method-assign]
    for index in range(200):
        log.line("POST", f"/v1/messages/{index}", "u", 200, 0.001, 5, "ok")
    log.line("POST", "/v1/" + "x" * (2 * PIPE_BUF), "u", 200, 0.001, 5, "ok")  # one long line
    log.flush()
    os.close(write)
    data = read_all(read)
    os.close(read)
    assert len(writes) > 2
    for chunk in writes:
        assert chunk.endswith(b"\n")
        assert len(chunk) <= PIPE_BUF or chunk.count(b"\n") == 1
    lines = [json.loads(line) for line in data.splitlines()]
    assert [line["path"] for line in lines[:200]] == [f"/v1/messages/{i}" for i in range(200)]
    assert len(lines) == 201


def test_lines_of_one_loop_pass_share_one_write_right_after_it() -> None:
    async def run() -> tuple[list[bytes], bytes]:
        read, write = os.pipe()
        log = AccessLog(fd=write)
        writes: list[bytes] = []
        real = log._write

        def spy(data: bytes) -> int:
            writes.append(data)
            return real(data)

        log._write = spy  # type: ignore[method-assign]
        log.open()
        log.enabled = True
        for index in range(3):
            log.line("GET", f"/v1/models/{index}", "u", 200, 0.001, 5, "ok")
        assert writes == []  # nothing written inside the pass
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        log.close()
        os.close(write)
        try:
            return writes, read_all(read)
        finally:
            os.close(read)

    writes, data = asyncio.run(run())
    assert len(writes) == 1
    assert [json.loads(line)["path"] for line in data.splitlines()] == [
        f"/v1/models/{i}" for i in range(3)
    ]


@pytest.mark.slow
def test_a_clean_stop_writes_every_line(
    gateway_env: dict[str, str], tmp_path: Path
) -> None:
    """Every request has its line, none lost or mixed, through a clean stop."""
    gateway = launch(gateway_env, workers=2, log_dir=tmp_path)
    try:
        token, _ = gateway.user_with_key("alice")
        marker = f"/v1/models/{uuid.uuid4().hex}"
        with httpx.Client(timeout=10) as client:
            for index in range(40):
                response = client.get(
                    f"{gateway.url}{marker}-{index}",
                    headers={"x-api-key": token, "connection": "close"},
                )
                assert response.status_code == 404  # the fake's answer, relayed
    finally:
        assert gateway.stop() == 0
    records = [
        json.loads(line)
        for line in gateway.log_path.read_text().splitlines()
        if line.startswith("{")
    ]
    logged = [record for record in records if str(record.get("path", "")).startswith(marker)]
    assert sorted(record["path"] for record in logged) == sorted(
        f"{marker}-{index}" for index in range(40)
    )
    assert all(record.keys() >= FIELDS and record["msg"] == "proxied" for record in logged)


def test_a_full_non_blocking_stderr_keeps_the_lines_whole_and_in_order() -> None:
    """EAGAIN keeps the rest for a retry: nothing dropped, no line cut and glued to the
    next (a long line partly taken is finished before anything else)."""

    async def run() -> bytes:
        read, write = os.pipe()
        os.set_blocking(write, False)
        os.set_blocking(read, False)
        filler = 0
        try:
            while True:
                filler += os.write(write, b"f" * 4096)
        except BlockingIOError:
            pass
        os.read(read, 3000)  # room for part of a line, not all of it
        log = AccessLog(fd=write)
        log.open()
        log.line("POST", "/v1/" + "x" * 6000, "u", 200, 0.001, 5, "ok")
        for index in range(50):
            log.line("POST", f"/v1/messages/{index}", "u", 200, 0.001, 5, "ok")
        log.flush()
        assert log._out  # stderr is full: the rest waits
        received = b""
        deadline = asyncio.get_running_loop().time() + 5
        while asyncio.get_running_loop().time() < deadline:
            with contextlib.suppress(BlockingIOError):
                received += os.read(read, 65536)
            if not log._out and not log._lines:
                break
            await asyncio.sleep(0.005)
        log.close()
        try:
            while chunk := os.read(read, 65536):
                received += chunk
        except BlockingIOError:
            pass
        os.close(read)
        os.close(write)
        return received[filler - 3000 :]

    data = asyncio.run(run())
    lines = [json.loads(line) for line in data.splitlines()]
    assert [line["path"] for line in lines] == ["/v1/" + "x" * 6000] + [
        f"/v1/messages/{i}" for i in range(50)
    ]
