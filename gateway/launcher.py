"""``gateway serve``: claim the namespace, run the reaper, serve metrics, supervise Granian."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType

import msgspec

from gateway.address import AddressClaim, AddressTaken
from gateway.cap_sync import CapSync
from gateway.instances import GatewayInfo, encode_info
from gateway.metrics.exporter import (
    GatewayCollector,
    MetricsServer,
    ReapedPermits,
    SharedReadings,
    UserDirectory,
    build_registry,
    read_directory,
)
from gateway.metrics.folder import MetricsFolder
from gateway.resources import resolve_keyring
from gateway.settings import GranianOptions, Settings, namespace_prefix, redacted_url
from gateway.tls import CLEARTEXT_WARNING, is_loopback
from ipc.errors import GatesUnavailable
from ipc.leases import Redis, Store
from ipc.namespace import NamespaceClaim
from ipc.naming import metrics_dir
from ipc.reaper import Reaped, Reaper, reap_once
from storage import repository
from storage.engine import connected
from storage.errors import DecryptionError, MasterKeyError
from storage.keyring import Keyring
from storage.repository import KeyCap

log = logging.getLogger("gateway.launcher")

# A Granian server that exits on its own sooner than this after starting is taken to be
# misconfigured (port in use, bad target) and not restarted.
MIN_UPTIME_FOR_RESTART = 10.0
# Below this many descriptors per worker, warn: each open stream holds two.
FEW_FILES = 8192
# How long a scrape waits for the database to name the users.
DIRECTORY_TIMEOUT = 2.0


class LaunchError(Exception):
    """The launcher cannot start as configured (the message says what to change)."""


def raise_open_file_limit() -> tuple[int, int]:
    """Raise our soft limit on open files to the hard one; the workers inherit it.

    Every open stream holds two descriptors (the client's connection and the upstream's),
    so the soft limit many systems start services with (1,024) would refuse connections
    from about 500 streams per worker on. Returns (before, after).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # a platform cap below the hard limit (macOS)
            return soft, soft
        return soft, target
    return soft, soft


async def prepare_database(settings: Settings) -> repository.StoredKeySample | None:
    """Create the data folder and apply migrations (idempotent); one stored key, if any,
    to try the master key on."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    async with connected(settings.database_url):
        return await repository.sample_stored_key()


def check_master_key(settings: Settings, sample: repository.StoredKeySample | None) -> Keyring:
    """The master keyring, proven on one stored key: a wrong key refuses to start here
    rather than answer every request with a 500."""
    source = "GATEWAY_MASTER_KEY" if settings.master_key is not None else "master key file"
    if sample is not None and settings.master_key is None and not settings.master_key_file.exists():
        raise LaunchError(
            f"GATEWAY_MASTER_KEY: the database holds encrypted keys, so the master key they "
            f"were written with is needed, got neither GATEWAY_MASTER_KEY nor the key file "
            f"{settings.master_key_file} (restore it from your backup)"
        )
    try:
        keyring = resolve_keyring(settings).current()
    except MasterKeyError as exc:
        where = (
            "GATEWAY_MASTER_KEY"
            if settings.master_key is not None
            else f"GATEWAY_MASTER_KEY (key file {settings.master_key_file})"
        )
        raise LaunchError(f"{where}: {exc}") from None
    if sample is not None:
        try:
            keyring.decrypt(
                sample.ciphertext, sample.nonce, key_id=sample.key_id, user_id=sample.user_id
            )
        except DecryptionError:
            raise LaunchError(
                f"GATEWAY_MASTER_KEY: must hold the key this database's Anthropic keys were "
                f"encrypted with, got a {source} that does not decrypt the stored key of "
                f"user {sample.user_name!r}"
                + ("" if sample.key_id is None else f" (master key id {sample.key_id})")
            ) from None
    return keyring


def worker_environment(settings: Settings) -> dict[str, str]:
    """The environment every worker reads its Settings from: the launcher's, made explicit."""
    env = dict(os.environ)
    env.update(
        GATEWAY_DATA_DIR=str(settings.data_dir),
        GATEWAY_DATABASE_URL=settings.database_url,
        GATEWAY_IPC_NAMESPACE=settings.ipc_namespace,
        GATEWAY_HOST=settings.host,
        GATEWAY_PORT=str(settings.port),
        GATEWAY_UPSTREAM_URL=settings.upstream_url,
        GATEWAY_QUEUE_TIMEOUT=str(settings.queue_timeout),
    )
    # Granian's Rust side allocates with its own (prefixed) jemalloc, which by default
    # keeps freed pages for 10 s: a worker's resident memory then climbs with every wave
    # of connections. Returning them after a second holds it near the open streams' need.
    env.setdefault("_RJEM_MALLOC_CONF", "dirty_decay_ms:1000,muzzy_decay_ms:0")
    # The workers count into this folder when the metrics endpoint is on, and not at all
    # when it is off (prometheus_client reads the variable when first imported).
    if settings.metrics_port:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir(settings.ipc_namespace))
    else:
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    # Validated (and warned about) once here, not once per worker.
    if settings.max_global_concurrent is None:
        env.pop("PROXY_MAX_GLOBAL_CONCURRENT", None)
    else:
        env["PROXY_MAX_GLOBAL_CONCURRENT"] = str(settings.max_global_concurrent)
    return env


def wait_for_shared_gates(settings: Settings) -> None:
    """Shared gates: the store must answer at start (a clear error, not a server that
    only answers 503), and when it has just lost its data (or is new) admission waits one
    lease time for the live leases of every host to be renewed: wait here instead."""
    assert settings.gates_url is not None
    store = Store(
        settings.gates_url.reveal(), settings.gates_prefix, lease_seconds=settings.lease_seconds
    )
    where = redacted_url(settings.gates_url.reveal())
    try:
        started = store.start(settings.max_global_concurrent)
    except GatesUnavailable as exc:
        raise GatesUnavailable(
            f"GATEWAY_GATES_URL: the coordination store {where} does not answer: {exc}"
        ) from None
    log.info(
        "caps are shared through Redis",
        extra={
            "gates": where,
            "prefix": settings.gates_prefix,
            "lease_seconds": settings.lease_seconds,
        },
    )
    if started.recorded and started.previous_cap != settings.max_global_concurrent:
        log.warning(
            "another gateway on this Redis prefix started with PROXY_MAX_GLOBAL_CONCURRENT=%s, "
            "this one with %s: run every host with the same global cap (each host enforces "
            "its own against the shared count)",
            started.previous_cap,
            settings.max_global_concurrent,
        )
    if started.wait > 0:
        log.warning(
            "the coordination store holds no state for prefix %r (new, or it lost its data): "
            "admission starts in %.1f s, once every live lease has been renewed",
            settings.gates_prefix,
            started.wait,
        )
        time.sleep(started.wait)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llm-gateway")
    except PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        return "unknown"


class Launcher:
    def __init__(self, settings: Settings, options: GranianOptions) -> None:
        self.settings = settings
        self.options = options
        self.stopping = False
        self.child: subprocess.Popen[bytes] | None = None
        self.reaped = ReapedPermits()
        self.metrics_folder = (
            MetricsFolder.of(settings.ipc_namespace) if settings.metrics_port else None
        )
        self.metrics_url: str | None = None

    def _reaped(self, reaped: list[Reaped]) -> None:
        """Every reaper pass: count the permits given back, and tidy the dead workers'
        metrics (prometheus_client's ``mark_process_dead``, then the fold)."""
        self.reaped.add(reaped)
        if self.metrics_folder is not None:
            self.metrics_folder.workers_died([item.pid for item in reaped])

    def _serve_metrics(self, cap_sync: CapSync) -> MetricsServer | None:
        settings = self.settings
        if self.metrics_folder is None:
            return None

        def directory() -> UserDirectory:
            return cap_sync.call(read_directory, timeout=DIRECTORY_TIMEOUT)

        shared: Callable[[list[KeyCap]], SharedReadings] | None = None
        if settings.gates_url is not None:
            store = Store(
                settings.gates_url.reveal(),
                settings.gates_prefix,
                lease_seconds=settings.lease_seconds,
            )

            def shared(keys: list[KeyCap]) -> SharedReadings:
                async def read(client: Redis) -> SharedReadings:
                    readings = await store.readings(client, [key.user_id for key in keys])
                    return SharedReadings(await store.global_cap(client), readings)

                return store.run(read)  # its own loop, in the scrape's thread

        collector = GatewayCollector(
            settings.ipc_namespace,
            folder=self.metrics_folder,
            reaped=self.reaped,
            directory=directory,
            queue_places=settings.queue_max_waiters if settings.queue_timeout > 0 else 0,
            shared=shared,
        )
        try:
            server = MetricsServer(
                build_registry(collector), settings.metrics_host, settings.metrics_port
            )
        except OSError as exc:
            raise LaunchError(
                f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port} "
                f"({exc.strerror or exc}); set GATEWAY_METRICS_PORT (or --metrics-port) to a "
                "free port, or to 0 to turn metrics off"
            ) from None
        server.start()
        host = settings.metrics_host
        self.metrics_url = f"http://{f'[{host}]' if ':' in host else host}:{server.port}/metrics"
        return server

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def _start_child(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway.granian_main", msgspec.json.encode(self.options)],
            env=worker_environment(self.settings),
            # Its own session: a terminal's Ctrl-C reaches only us, and we stop it in order.
            start_new_session=True,
        )

    def run(self, *, ready: Callable[[], None] = lambda: None) -> int:
        """Check everything (address, database, master key, shared gates), call ``ready``
        (the command line prints its banner), then serve until stopped."""
        settings = self.settings
        # SIGHUP (a closed terminal, a habitual `kill -HUP` to reload) neither stops nor
        # reloads: settings are read once at start; restart the gateway to change them.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        claim = AddressClaim(settings.host, settings.port)
        try:
            claim.claim()
        except AddressTaken as exc:
            raise LaunchError(str(exc)) from None
        try:
            return self._run(ready)
        finally:
            claim.release()

    def _run(self, ready: Callable[[], None]) -> int:
        settings = self.settings
        before, after = raise_open_file_limit()
        if after < FEW_FILES:
            log.warning(
                "open-file limit %d: each worker can hold about %d streams at once; raise the "
                "hard limit (ulimit -Hn, systemd LimitNOFILE) for more",
                after,
                after // 2 - 16,
            )
        elif after != before:
            log.info("open-file limit raised from %d to %d", before, after)
        if not settings.tls and not is_loopback(settings.host):
            log.warning(CLEARTEXT_WARNING.format(host=settings.host))
        sample = asyncio.run(prepare_database(settings))
        keyring = check_master_key(settings, sample)
        log.info(
            "master keyring",
            extra={
                "key_ids": list(keyring.key_ids),
                "source": "GATEWAY_MASTER_KEY"
                if settings.master_key is not None
                else str(settings.master_key_file),
            },
        )
        if settings.gates_url is not None:
            wait_for_shared_gates(settings)
        info = GatewayInfo(
            data_dir=str(settings.data_dir),
            database_url=settings.database_url,
            host=settings.host,
            port=settings.port,
            workers=self.options.workers,
            started_at=datetime.now(UTC).isoformat(timespec="seconds"),
            version=_version(),
        )
        with NamespaceClaim(
            settings.ipc_namespace,
            # With shared gates the caps live in Redis; the namespace keeps the lock and the
            # change counter (the command line finds a running gateway by them).
            global_cap=None if settings.shared_gates else settings.max_global_concurrent,
            tag=namespace_prefix(settings.database_url),
            info=encode_info(info),
        ):
            if self.metrics_folder is not None:
                self.metrics_folder.prepare()
            shared = settings.shared_gates
            # With shared gates, leases need no reaper (they expire), no audit (the count is
            # the set of leases) and no cap sync (a reloading worker pushes the row it
            # read); the reaper's thread still tidies dead workers' metrics, and the cap
            # sync's thread still hosts the database the metrics' user names come from.
            reaper = Reaper(
                settings.ipc_namespace,
                audit_interval=0 if shared else settings.cap_audit_interval,
                on_reaped=self._reaped,
            )
            reaper.start()
            cap_sync = CapSync(settings.ipc_namespace, settings.database_url, posix=not shared)
            cap_sync.start()
            server = None
            try:
                server = self._serve_metrics(cap_sync)
                for signum in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(signum, self._on_signal)
                ready()
                return self._supervise()
            finally:
                if server is not None:
                    server.stop()
                cap_sync.stop()
                reaper.stop()
                self._reaped(reap_once(settings.ipc_namespace))
                if self.metrics_folder is not None:
                    self.metrics_folder.remove()

    def _supervise(self) -> int:
        while True:
            started = time.monotonic()
            self.child = self._start_child()
            log.info(
                "gateway serving",
                extra={
                    "url": f"{self.settings.scheme}://{self.settings.host}:{self.settings.port}",
                    "workers": self.options.workers,
                    "namespace": self.settings.ipc_namespace,
                    "global_cap": self.settings.max_global_concurrent,
                    "granian_pid": self.child.pid,
                    "metrics": self.metrics_url,
                },
            )
            code = self._wait_child()
            if self.stopping:
                return 0
            uptime = time.monotonic() - started
            if uptime < MIN_UPTIME_FOR_RESTART:
                log.error(
                    "the Granian server exited after %.1f s (code %s); stopping", uptime, code
                )
                return code or 1
            # Granian gives up after a worker crash loop. The namespace and every permit
            # survive here: the reaper returns the dead workers' permits; we start again.
            log.error("the Granian server exited (code %s); restarting it", code)
            self._reaped(reap_once(self.settings.ipc_namespace))

    def _wait_child(self) -> int:
        assert self.child is not None
        while True:
            try:
                return self.child.wait()
            except KeyboardInterrupt:  # pragma: no cover - handled by _on_signal
                continue
