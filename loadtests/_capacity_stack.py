"""What a capacity run stands up and tears down: a real ``gateway serve`` and its users."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx

from ipc.namespace import purge
from ipc.naming import lock_path
from loadtests.procs import grandchildren
from storage.crypto import MasterKey

ROOT: Final = Path(__file__).resolve().parents[1]
REJECTION_LOG: Final = "request rejected over a concurrency cap"
_CREATED_LINE: Final = re.compile(r"created user (?P<name>\S+) \((?P<id>[0-9a-f-]{36})\)")
_ISSUED_LINE: Final = re.compile(r"issued token (?P<id>\d+) for ")


class StackError(Exception):
    """A part of the stack did not start, or a setup step through it failed."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fresh_namespace() -> str:
    return f"cap{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True, kw_only=True)
class Credential:
    """A gateway user with a stored key: what the load uses and what the checks look up."""

    name: str
    user_id: str
    token: str = field(repr=False)
    upstream_key: str = field(repr=False)
    cap: int


class GatewayServer:
    """``python -m gateway serve`` on loopback, on its own database, data dir and namespace."""

    def __init__(
        self,
        *,
        workdir: Path,
        upstream_url: str,
        workers: int,
        global_cap: int | None,
        log_level: str = "WARNING",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.workers = workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_port = free_port()
        self.namespace = fresh_namespace()
        self.log_path = workdir / "gateway.log"
        # Nothing inherited from the operator's shell decides where this gateway points.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "PROXY_"))}
        env.update(
            GATEWAY_DATA_DIR=str(workdir / "data"),
            GATEWAY_DATABASE_URL=f"sqlite:///{workdir / 'gateway.sqlite3'}",
            GATEWAY_IPC_NAMESPACE=self.namespace,
            GATEWAY_UPSTREAM_URL=upstream_url,
            GATEWAY_MASTER_KEY=MasterKey.generate().to_base64(),
            GATEWAY_LOG_LEVEL=log_level,
            GATEWAY_PORT=str(self.port),
            # Metrics on, as in production, on a port of its own (never the default 9464,
            # which a real gateway on this host may hold).
            GATEWAY_METRICS_PORT=str(self.metrics_port),
        )
        if global_cap is not None:
            env["PROXY_MAX_GLOBAL_CONCURRENT"] = str(global_cap)
        env.update(extra_env or {})
        self.env = env
        self._process: subprocess.Popen[bytes] | None = None
        self._http = httpx.Client(base_url=self.url, timeout=15.0)

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self, *, timeout: float = 40.0) -> None:
        command = [sys.executable, "-m", "gateway", "serve", "--port", str(self.port)]
        command += ["--workers", str(self.workers), "--worker-kill-timeout", "5"]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise StackError(f"gateway serve exited with {self._process.returncode}")
            try:
                if self._http.get("/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise StackError(f"gateway serve was not ready within {timeout:g} s")

    def stop(self, *, timeout: float = 20.0) -> int | None:
        """SIGTERM to the launcher (it stops Granian and frees the namespace), then SIGKILL."""
        self._http.close()
        process = self._process
        code = None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            code = process.returncode
        # The launcher unlinks its namespace on the way out; after a SIGKILL nobody did.
        purge(self.namespace)
        lock_path(self.namespace).unlink(missing_ok=True)
        return code

    def worker_pids(self) -> list[int]:
        """The Granian workers: launcher > Granian server > workers."""
        return [] if self.pid is None else grandchildren(self.pid)

    def access_records(self) -> list[dict[str, Any]]:
        """The workers' access log lines (JSON), parsed."""
        records = []
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        for line in text.splitlines():
            if '"gateway.access"' in line:
                with contextlib.suppress(json.JSONDecodeError):
                    records.append(json.loads(line))
        return records

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the gateway's log, without the one warning every 429 logs."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        kept = [line for line in text.splitlines() if REJECTION_LOG not in line]
        return "\n".join(kept[-lines:])

    def cli(self, *args: str, timeout: float = 60.0) -> str:
        """The real command line, as an operator runs it; its stdout."""
        result = subprocess.run(
            [sys.executable, "-m", "gateway", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise StackError(
                f"gateway {' '.join(args)} exited {result.returncode}: {result.stderr[-500:]}"
            )
        return result.stdout

    def create_credential(self, name: str, *, cap: int) -> Credential:
        """``gateway users create`` then ``PUT /api/v1/me/anthropic-key`` with a cap."""
        out = self.cli("users", "create", name)
        lines = out.strip().splitlines()
        created = _CREATED_LINE.search(out)
        if created is None or not lines:
            raise StackError(f"gateway users create {name}: unexpected output {out[:200]!r}")
        token = lines[-1].strip()
        key = f"sk-ant-load-{name}-{uuid.uuid4().hex[:8]}"
        self.put_key(token, {"key": key, "max_concurrent": cap})
        return Credential(name=name, user_id=created["id"], token=token, upstream_key=key, cap=cap)

    def issue_token(self, name: str) -> tuple[int, str]:
        """``gateway tokens issue NAME``: (token id, token)."""
        out = self.cli("tokens", "issue", name, "--label", "churn")
        found = _ISSUED_LINE.search(out)
        if found is None:
            raise StackError(f"gateway tokens issue {name}: unexpected output {out[:200]!r}")
        return int(found["id"]), out.strip().splitlines()[-1].strip()

    def probe(self, token: str) -> int:
        """One short message with ``token``; its status (a worker caches the token)."""
        try:
            response = self._http.post(
                "/v1/messages",
                json={"model": "m", "max_tokens": 8, "messages": []},
                headers={"x-api-key": token},
            )
        except httpx.HTTPError as exc:
            raise StackError(f"probe: {exc}") from exc
        return response.status_code

    def put_key(self, token: str, body: dict[str, Any]) -> None:
        response = self._http.put(
            "/api/v1/me/anthropic-key", json=body, headers={"authorization": f"Bearer {token}"}
        )
        if response.status_code != 204:
            raise StackError(f"PUT anthropic-key: {response.status_code} {response.text[:200]}")

    def stored_cap(self, token: str) -> int | None:
        response = self._http.get(
            "/api/v1/me/anthropic-key", headers={"authorization": f"Bearer {token}"}
        )
        response.raise_for_status()
        cap = response.json().get("max_concurrent")
        return cap if isinstance(cap, int) else None

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        """One scrape of the launcher's /metrics, parsed as Prometheus does; None if it
        does not answer."""
        from prometheus_client.parser import text_string_to_metric_families

        try:
            response = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
        }

    def caps(self) -> list[dict[str, Any]]:
        """``gateway caps --json``: one object per semaphore of this gateway's namespace."""
        out = self.cli("caps", "--json", "--namespace", self.namespace)
        return [json.loads(line) for line in out.splitlines() if line.strip()]
