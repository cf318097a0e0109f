"""Settings read from the environment once, into a frozen typed object."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import msgspec

log = logging.getLogger("gateway.settings")

DEFAULT_UPSTREAM_URL: Final = "https://api.anthropic.com"
MAX_REQUEST_BODY: Final = 32 * 1024 * 1024
LOG_LEVELS: Final = ("INFO", "DEBUG", "WARNING", "ERROR", "CRITICAL")


class SettingsError(Exception):
    """A variable of the environment holds a value the gateway cannot use."""


class Secret(str):
    """A string that prints as stars, so a secret never reaches a log by accident."""

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return "**********"

    def reveal(self) -> str:
        return str.__str__(self)


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    data_dir: Path
    database_url: str
    # GATEWAY_MASTER_KEY: one key, or a keyring (new first) separated by commas.
    master_key: Secret | None = None
    # GATEWAY_MASTER_KEY_FILE: a keyring file (one key a line, new first), read again by
    # running workers when it changes; None: the data folder's master.key (SQLite only).
    master_key_path: Path | None = None
    # GATEWAY_TLS_CERT / GATEWAY_TLS_KEY: serve HTTPS (both or neither).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    upstream_url: str = DEFAULT_UPSTREAM_URL
    upstream_read_timeout: float = 600.0
    upstream_connect_timeout: float = 10.0
    upstream_transport: str = "h1"
    max_global_concurrent: int | None = None
    ipc_namespace: str
    host: str = "127.0.0.1"
    port: int = 8080
    retry_after_seconds: int = 1
    log_level: str = "INFO"
    heap_trim_interval: float = 1.0  # 0: never trim
    cap_audit_interval: float = 2.0  # 0: no drift audit
    # GATEWAY_GATES_URL: None = POSIX gates (one host); a redis:// URL = caps shared by
    # every gateway on every host using the same Redis, database and prefix.
    gates_url: Secret | None = None
    gates_prefix: str = "gateway:"
    lease_seconds: float = 15.0
    request_body_timeout: float = 30.0
    queue_timeout: float = 0.0  # 0: over a cap is an instant 429 (no waiting line)
    queue_max_waiters: int = 64
    # The launcher's Prometheus endpoint; port 0 turns metrics off (workers count nothing).
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    # PROMETHEUS_MULTIPROC_DIR: set by the launcher for its workers (None: metrics off).
    metrics_dir: Path | None = None
    # Seconds between a worker's writes of its usage totals; 0: usage is not counted.
    usage_flush_interval: float = 2.0
    # How often each worker writes its tokens' last-used times (and the least time
    # between two writes of one token's).
    token_use_interval: float = 60.0

    @property
    def master_key_file(self) -> Path:
        return self.master_key_path or self.data_dir / "master.key"

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def shared_gates(self) -> bool:
        """Caps on Redis leases (several hosts) rather than POSIX semaphores."""
        return self.gates_url is not None

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite:")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read every GATEWAY_* variable (and PROXY_MAX_GLOBAL_CONCURRENT) once.

        ``overrides`` (from command-line flags) win over the environment.
        """
        env = os.environ if environ is None else environ
        data_dir = Path(
            str(overrides.get("data_dir") or env.get("GATEWAY_DATA_DIR") or "gateway-data")
        )
        data_dir = data_dir.expanduser().absolute()
        database_url = str(
            overrides.get("database_url")
            or env.get("GATEWAY_DATABASE_URL")
            or f"sqlite:///{data_dir / 'gateway.sqlite3'}"
        )
        if not database_url.startswith(("sqlite:///", "postgres://", "postgresql://")):
            raise SettingsError(
                "GATEWAY_DATABASE_URL: must start with sqlite:/// or postgresql://, "
                f"got {database_url.split(':', 1)[0]!r}"
            )
        port = parse_int(
            overrides.get("port") or env.get("GATEWAY_PORT"), "GATEWAY_PORT", 8080, lo=0, hi=65535
        )
        metrics_port = parse_int(
            overrides["metrics_port"]
            if overrides.get("metrics_port") is not None
            else env.get("GATEWAY_METRICS_PORT"),
            "GATEWAY_METRICS_PORT",
            9464,
            lo=0,
            hi=65535,
        )
        metrics_dir = env.get("PROMETHEUS_MULTIPROC_DIR")
        raw_key = env.get("GATEWAY_MASTER_KEY")
        key_file = env.get("GATEWAY_MASTER_KEY_FILE")
        if raw_key and key_file:
            raise SettingsError(
                "set GATEWAY_MASTER_KEY or GATEWAY_MASTER_KEY_FILE, not both: the keyring "
                "must come from one place"
            )
        tls_cert = overrides.get("tls_cert") or env.get("GATEWAY_TLS_CERT")
        tls_key = overrides.get("tls_key") or env.get("GATEWAY_TLS_KEY")
        if bool(tls_cert) != bool(tls_key):
            raise SettingsError(
                "TLS needs both a certificate and its key: set GATEWAY_TLS_CERT and "
                "GATEWAY_TLS_KEY (or --tls-cert and --tls-key) together"
            )
        namespace = str(
            overrides.get("ipc_namespace")
            or env.get("GATEWAY_IPC_NAMESPACE")
            or default_namespace(database_url, port)
        )
        return cls(
            data_dir=data_dir,
            database_url=database_url,
            master_key=Secret(raw_key) if raw_key else None,
            master_key_path=Path(key_file).expanduser().absolute() if key_file else None,
            tls_cert=Path(str(tls_cert)).expanduser().absolute() if tls_cert else None,
            tls_key=Path(str(tls_key)).expanduser().absolute() if tls_key else None,
            upstream_url=_upstream_url(
                str(
                    overrides.get("upstream_url")
                    or env.get("GATEWAY_UPSTREAM_URL")
                    or DEFAULT_UPSTREAM_URL
                )
            ),
            upstream_read_timeout=_float(
                env.get("GATEWAY_UPSTREAM_READ_TIMEOUT"), "GATEWAY_UPSTREAM_READ_TIMEOUT", 600.0
            ),
            upstream_connect_timeout=_float(
                env.get("GATEWAY_UPSTREAM_CONNECT_TIMEOUT"),
                "GATEWAY_UPSTREAM_CONNECT_TIMEOUT",
                10.0,
            ),
            upstream_transport=_choice(
                env.get("GATEWAY_UPSTREAM_TRANSPORT"),
                "GATEWAY_UPSTREAM_TRANSPORT",
                ("h1", "aiohttp", "httpx"),
            ),
            max_global_concurrent=(
                parse_int(overrides["global_cap"], "--global-cap", 1, lo=1)
                if overrides.get("global_cap") is not None
                else parse_global_cap(env.get("PROXY_MAX_GLOBAL_CONCURRENT"))
            ),
            ipc_namespace=namespace,
            host=_host(str(overrides.get("host") or env.get("GATEWAY_HOST") or "127.0.0.1")),
            port=port,
            retry_after_seconds=parse_int(
                env.get("GATEWAY_RETRY_AFTER"), "GATEWAY_RETRY_AFTER", 1, lo=0
            ),
            log_level=_log_level(env.get("GATEWAY_LOG_LEVEL")),
            heap_trim_interval=_float(
                env.get("GATEWAY_HEAP_TRIM_INTERVAL"), "GATEWAY_HEAP_TRIM_INTERVAL", 1.0, zero=True
            ),
            cap_audit_interval=_float(
                env.get("GATEWAY_CAP_AUDIT_INTERVAL"), "GATEWAY_CAP_AUDIT_INTERVAL", 2.0, zero=True
            ),
            gates_url=parse_gates_url(env.get("GATEWAY_GATES_URL")),
            gates_prefix=_gates_prefix(env.get("GATEWAY_GATES_PREFIX")),
            lease_seconds=_lease_seconds(env.get("GATEWAY_LEASE_SECONDS")),
            request_body_timeout=_float(
                env.get("GATEWAY_REQUEST_BODY_TIMEOUT"), "GATEWAY_REQUEST_BODY_TIMEOUT", 30.0
            ),
            queue_timeout=_float(
                str(overrides["queue_timeout"])
                if overrides.get("queue_timeout") is not None
                else env.get("GATEWAY_QUEUE_TIMEOUT"),
                "GATEWAY_QUEUE_TIMEOUT",
                0.0,
                zero=True,
            ),
            queue_max_waiters=parse_int(
                env.get("GATEWAY_QUEUE_MAX_WAITERS"), "GATEWAY_QUEUE_MAX_WAITERS", 64, lo=1
            ),
            metrics_host=str(
                overrides.get("metrics_host") or env.get("GATEWAY_METRICS_HOST") or "127.0.0.1"
            ),
            metrics_port=metrics_port,
            metrics_dir=Path(metrics_dir) if metrics_dir else None,
            usage_flush_interval=_float(
                env.get("GATEWAY_USAGE_FLUSH_INTERVAL"),
                "GATEWAY_USAGE_FLUSH_INTERVAL",
                2.0,
                zero=True,
            ),
            token_use_interval=_float(
                env.get("GATEWAY_TOKEN_USE_INTERVAL"), "GATEWAY_TOKEN_USE_INTERVAL", 60.0
            ),
        )


def database_url_from_env(environ: Mapping[str, str] | None = None) -> str:
    """GATEWAY_DATABASE_URL, or the SQLite file in GATEWAY_DATA_DIR, unchecked (for
    Piccolo's own configuration module)."""
    env = os.environ if environ is None else environ
    data_dir = Path(env.get("GATEWAY_DATA_DIR") or "gateway-data").expanduser().absolute()
    return env.get("GATEWAY_DATABASE_URL") or f"sqlite:///{data_dir / 'gateway.sqlite3'}"


def database_configured(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment names the data folder or the database (else the default,
    ./gateway-data, applies: the command line then looks for a running gateway's)."""
    env = os.environ if environ is None else environ
    return bool(env.get("GATEWAY_DATA_DIR") or env.get("GATEWAY_DATABASE_URL"))


def namespace_configured(environ: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    return env.get("GATEWAY_IPC_NAMESPACE") or None


def parse_global_cap(raw: str | None) -> int | None:
    """``PROXY_MAX_GLOBAL_CONCURRENT``: unset means no global cap; anything invalid warns."""
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = 0
    if value <= 0:
        log.warning(
            "PROXY_MAX_GLOBAL_CONCURRENT=%r is not a positive integer; "
            "running without a global cap",
            raw,
        )
        return None
    return value


def parse_gates_url(raw: str | None) -> Secret | None:
    """``GATEWAY_GATES_URL``: unset, empty or ``posix:`` = POSIX gates; ``redis://`` or
    ``rediss://`` = shared gates (the URL may hold a password: kept as a Secret)."""
    if raw is None or raw.strip() in ("", "posix:"):
        return None
    raw = raw.strip()
    scheme = raw.split(":", 1)[0].lower()
    if scheme not in ("redis", "rediss"):
        raise SettingsError(
            f"GATEWAY_GATES_URL: must be posix: or a redis:// or rediss:// URL, got {scheme!r}"
        )
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - parsing the port is the check
        database = parts.path.strip("/")
    except ValueError as exc:
        raise SettingsError(f"GATEWAY_GATES_URL: must be a valid URL ({exc})") from None
    if not parts.hostname:
        raise SettingsError(
            "GATEWAY_GATES_URL: must name a host (redis://HOST:PORT/DB), got no host"
        )
    if database and not database.isdigit():
        raise SettingsError(
            f"GATEWAY_GATES_URL: the database must be a number (redis://host:port/0), "
            f"got {database!r}"
        )
    return Secret(raw)


def redacted_url(url: str) -> str:
    """A URL fit for logs: any password replaced by stars."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


def _gates_prefix(raw: str | None) -> str:
    if raw is None or raw == "":
        return "gateway:"
    if not re.fullmatch(r"[A-Za-z0-9_.:{}-]{1,64}", raw):
        raise SettingsError(
            "GATEWAY_GATES_PREFIX: must be 1..64 characters of letters, digits and "
            f"_ . : - {{ }}, got {raw!r}"
        )
    return raw


def _lease_seconds(raw: str | None) -> float:
    value = _float(raw, "GATEWAY_LEASE_SECONDS", 15.0)
    if value < 0.5:
        raise SettingsError(f"GATEWAY_LEASE_SECONDS: must be at least 0.5, got {raw!r}")
    return value


def database_identity(database_url: str) -> str:
    """A stable name for one database, however its URL is spelled."""
    if database_url.startswith("sqlite:///"):
        return "sqlite:" + str(Path(database_url.removeprefix("sqlite:///")).resolve())
    rest = database_url.split("://", 1)[1]
    hostpart = rest.rsplit("@", 1)[-1].split("?", 1)[0]
    return "postgresql:" + hostpart


def namespace_prefix(database_url: str) -> str:
    """Every default namespace over one database starts with this prefix."""
    digest = hashlib.sha256(database_identity(database_url).encode()).hexdigest()[:10]
    return f"gw{digest}"


def default_namespace(database_url: str, port: int) -> str:
    return f"{namespace_prefix(database_url)}p{port}"


def parse_int(raw: object, name: str, default: int, *, lo: int, hi: int | None = None) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise SettingsError(f"{name}: must be an integer, got {raw!r}") from None
    if value < lo:
        raise SettingsError(f"{name}: must be at least {lo}, got {value}")
    if hi is not None and value > hi:
        raise SettingsError(f"{name}: must be at most {hi}, got {value}")
    return value


def _float(raw: str | None, name: str, default: float, *, zero: bool = False) -> float:
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}: must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        allowed = "zero or positive" if zero else "positive"
        raise SettingsError(f"{name}: must be {allowed}, got {raw!r}")
    return value


def _choice(raw: str | None, name: str, choices: tuple[str, ...]) -> str:
    if not raw:
        return choices[0]
    if raw not in choices:
        raise SettingsError(f"{name}: must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def _log_level(raw: str | None) -> str:
    level = (raw or "INFO").strip().upper()
    if level not in LOG_LEVELS:
        raise SettingsError(
            f"GATEWAY_LOG_LEVEL: must be one of {', '.join(LOG_LEVELS)}, got {raw!r}"
        )
    return level


def _upstream_url(raw: str) -> str:
    """An http(s) URL with a host and nothing after the path: requests are appended to it."""
    url = raw.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.query
        or parts.fragment
    ):
        raise SettingsError(
            f"GATEWAY_UPSTREAM_URL: must be an http:// or https:// URL with a host, got {raw!r}"
        )
    return url


def _host(raw: str) -> str:
    host = raw.strip()
    if not host or any(c.isspace() or c in "/?#@" for c in host):
        raise SettingsError(f"GATEWAY_HOST: must be an IP address or host name, got {raw!r}")
    return host


class GranianOptions(msgspec.Struct, frozen=True, kw_only=True):
    """What the launcher passes to its Granian process (flags of ``gateway serve``)."""

    host: str
    port: int
    workers: int
    launcher_pid: int
    backlog: int = 8192
    # Granian's default is backlog / workers, counting idle keep-alive connections and
    # queueing the rest silently: far too few for long SSE streams.
    backpressure: int = 10_000
    worker_kill_timeout: int = 30
    worker_lifetime: int | None = None
    worker_max_rss: int | None = None
    respawn_interval: float = 1.0
    log_level: str = "INFO"
    loop: str = "uvloop"
    # HTTP/1.1 only: Granian's auto-detecting connection holds about 12 KiB more per open
    # stream (measured), and no agent SDK speaks cleartext HTTP/2 to a gateway.
    http: str = "1"
    # Granian's own TLS (checked by the launcher first: readable, private, matching).
    tls_cert: str | None = None
    tls_key: str | None = None
