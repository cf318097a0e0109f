"""The ``gateway`` command line: serve, migrate, users, tokens, caps, usage, keygen."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import click
import msgspec

from gateway.audit import audit
from gateway.logs import configure_logging
from gateway.settings import (
    GranianOptions,
    Settings,
    SettingsError,
    database_configured,
    database_identity,
    namespace_configured,
    namespace_prefix,
    parse_int,
    redacted_url,
)
from gateway.usage.command import usage_command
from ipc.audit import repairs_made
from ipc.caps import apply_cap, read_state
from ipc.errors import CredentialGone, GatesUnavailable, IpcError
from ipc.leases import CapReading, Redis, Store
from ipc.namespace import (
    bump_generations,
    held_by_ledgers,
    launcher_pid,
    running_namespaces,
    unlink_user_gates,
    usage,
)
from ipc.naming import credential_gate_name
from storage import repository
from storage.crypto import MasterKey
from storage.engine import connected
from storage.errors import StorageError
from storage.keyring import Keyring, read_keyring_file
from storage.names import label_problem, name_problem

T = TypeVar("T")


def _settings(*, discover: bool = True, **overrides: object) -> Settings:
    """Settings from the environment and flags, every one validated (one ``Error: NAME:
    rule, got value`` line and status 1 otherwise).

    With no data folder or database configured, the command line works on the running
    gateway's database rather than create ./gateway-data wherever it happens to be run:
    the gateway of GATEWAY_IPC_NAMESPACE if set, else the one gateway running on this
    host. It says loudly when it is about to create a new database beside a running
    gateway's.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = Settings.from_env(None, **given)
        if discover and "data_dir" not in given and not database_configured():
            settings = _running_gateways_settings(settings, given)
        configure_logging(settings.log_level)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    return settings


def _running_gateways_settings(settings: Settings, given: dict[str, object]) -> Settings:
    from gateway.instances import running_gateways

    gateways = running_gateways()
    namespace = namespace_configured()
    if namespace is not None:
        gateways = [g for g in gateways if g.launcher.namespace == namespace]
    ours = database_identity(settings.database_url)
    databases = {g.database: g for g in gateways}
    if not databases or ours in databases:
        return settings
    if len(databases) > 1:
        listed = "\n  ".join(g.describe() for g in databases.values())
        raise click.ClickException(
            "GATEWAY_DATA_DIR: must name the gateway to work on, got none while several "
            f"run with different databases:\n  {listed}\nset GATEWAY_DATA_DIR (or "
            "GATEWAY_DATABASE_URL, or GATEWAY_IPC_NAMESPACE) to choose one"
        )
    (gateway,) = databases.values()
    click.echo(f"using the database of the running {gateway.describe()}", err=True)
    return Settings.from_env(
        None,
        **{
            **given,
            "data_dir": gateway.info.data_dir,
            "database_url": gateway.info.database_url,
            "ipc_namespace": gateway.launcher.namespace,
        },
    )


def _warn_if_new_database(settings: Settings) -> None:
    """A new SQLite file while a gateway runs on another database is almost always a
    command run from the wrong folder: say so before creating it."""
    if not settings.is_sqlite:
        return
    path = Path(settings.database_url.removeprefix("sqlite:///"))
    if path.exists():
        return
    from gateway.instances import running_gateways

    ours = database_identity(settings.database_url)
    others = [g for g in running_gateways() if g.database != ours]
    if not others:
        return
    click.secho(
        f"WARNING: creating a NEW database {path}, while this host runs a gateway on "
        f"another one: {others[0].describe()}. Users and tokens made here are unknown to "
        "it; set GATEWAY_DATA_DIR to its data folder to work on it instead.",
        err=True,
        fg="yellow",
        bold=True,
    )


def _with_database(settings: Settings, work: Callable[[], Awaitable[T]]) -> T:
    _warn_if_new_database(settings)

    async def run() -> T:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        async with connected(settings.database_url):
            return await work()

    try:
        return asyncio.run(run())
    except StorageError as exc:
        raise click.ClickException(str(exc)) from None


def _announce_change(
    settings: Settings,
    *,
    deleted_user: uuid.UUID | None = None,
    cap_change: repository.KeyChange | None = None,
) -> None:
    """Running gateways over this database apply a cap change at once and drop their
    caches on their next request."""
    if settings.gates_url is not None:
        _announce_shared(settings, deleted_user=deleted_user, cap_change=cap_change)
        return
    if cap_change is not None and cap_change.current is not None:
        for namespace in running_namespaces(
            namespace_prefix(settings.database_url), explicit=settings.ipc_namespace
        ):
            with contextlib.suppress(CredentialGone):  # deleted meanwhile: nothing to resize
                apply_cap(
                    namespace,
                    cap_change.user_id,
                    version=cap_change.current.cap_version,
                    cap=cap_change.current.max_concurrent,
                    create=False,
                )
    namespaces = bump_generations(
        namespace_prefix(settings.database_url), explicit=settings.ipc_namespace
    )
    if deleted_user is not None:
        for namespace in namespaces:
            unlink_user_gates(namespace, deleted_user)


def _shared_store(settings: Settings) -> Store:
    assert settings.gates_url is not None
    return Store(
        settings.gates_url.reveal(), settings.gates_prefix, lease_seconds=settings.lease_seconds
    )


def _check_shared_gates(settings: Settings) -> None:
    """With shared gates, refuse a change (before anything is committed) while the store
    that tells every host about it does not answer."""
    if settings.gates_url is None:
        return
    store = _shared_store(settings)

    async def ping(client: Redis) -> None:
        await client.ping()

    try:
        store.run(ping)
    except GatesUnavailable as exc:
        raise click.ClickException(
            f"the coordination store {redacted_url(settings.gates_url.reveal())} does not "
            f"answer ({exc}); nothing was changed"
        ) from None


def _announce_shared(
    settings: Settings,
    *,
    deleted_user: uuid.UUID | None,
    cap_change: repository.KeyChange | None,
) -> None:
    """Push a cap (by version) and move Redis's change counter: every worker on every
    host reloads before its next admission."""
    store = _shared_store(settings)
    cap = None
    if cap_change is not None and cap_change.current is not None:
        cap = (
            cap_change.user_id,
            cap_change.current.cap_version,
            cap_change.current.max_concurrent,
        )

    async def work(client: Redis) -> int:
        return await store.announce(client, cap=cap, deleted_user=deleted_user)

    for attempt in range(5):
        try:
            store.run(work)
            return
        except GatesUnavailable as exc:
            if attempt == 4:
                raise click.ClickException(
                    "the change is saved in the database, but the coordination store does not "
                    f"answer ({exc}): gateway hosts may go on trusting what they cached until "
                    "the next change; run the command again once Redis answers"
                ) from None
            time.sleep(0.2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llm-gateway", prog_name="gateway")
def main() -> None:
    """An Anthropic-compatible LLM gateway with exact cross-process concurrency caps.

    Configuration comes from GATEWAY_* environment variables (see README.md); the
    database is GATEWAY_DATABASE_URL (default: SQLite in GATEWAY_DATA_DIR).
    """


@main.command()
@click.option(
    "--host", default=None, help="Address to listen on  [default: GATEWAY_HOST or 127.0.0.1]"
)
@click.option("--port", default=None, help="Port to listen on  [default: GATEWAY_PORT or 8080]")
@click.option(
    "--workers",
    envvar="GATEWAY_WORKERS",
    default=None,
    help="Granian worker processes  [default: GATEWAY_WORKERS or the number of cores]",
)
@click.option("--backlog", type=click.IntRange(min=128), default=8192, show_default=True)
@click.option(
    "--backpressure",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Connections per worker before Granian queues (idle keep-alives count).",
)
@click.option(
    "--worker-kill-timeout",
    type=click.IntRange(min=1),
    default=30,
    show_default=True,
    help="Seconds a worker gets to finish its streams on shutdown before SIGKILL.",
)
@click.option(
    "--worker-lifetime",
    type=click.IntRange(min=60),
    default=None,
    help="Recycle each worker after this many seconds.",
)
@click.option(
    "--worker-max-rss",
    type=click.IntRange(min=1),
    default=None,
    help="Recycle a worker whose resident memory exceeds this many MiB.",
)
@click.option(
    "--loop",
    type=click.Choice(["uvloop", "asyncio"]),
    default="uvloop",
    show_default=True,
    help="The workers' event loop.",
)
@click.option(
    "--http",
    type=click.Choice(["1", "auto"]),
    default="1",
    show_default=True,
    help="HTTP/1.1 only, or also HTTP/2 (prior knowledge). HTTP/1.1 only holds an open "
    "stream in about half the memory.",
)
@click.option(
    "--queue-timeout",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds a request over a cap may wait in line for a slot before its 429 "
    "[default: GATEWAY_QUEUE_TIMEOUT, or 0: an instant 429].",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port of the Prometheus endpoint (GET /metrics), apart from the proxy's; 0 turns "
    "metrics off.  [default: GATEWAY_METRICS_PORT or 9464]",
)
@click.option(
    "--metrics-host",
    default=None,
    help="Address of the Prometheus endpoint.  [default: GATEWAY_METRICS_HOST or 127.0.0.1]",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder of the SQLite database and the master key file  [default: "
    "GATEWAY_DATA_DIR or ./gateway-data]",
)
@click.option(
    "--upstream-url",
    default=None,
    help="The Anthropic API the gateway forwards to  [default: GATEWAY_UPSTREAM_URL or "
    "https://api.anthropic.com]",
)
@click.option(
    "--global-cap",
    type=click.IntRange(min=1),
    default=None,
    help="Requests in flight across all users at most  [default: "
    "PROXY_MAX_GLOBAL_CONCURRENT, or no global cap]",
)
@click.option(
    "--tls-cert",
    default=None,
    help="Serve HTTPS with this PEM certificate (chain), through Granian's own TLS; "
    "needs --tls-key.  [default: GATEWAY_TLS_CERT]",
)
@click.option(
    "--tls-key",
    default=None,
    help="The certificate's PEM private key (unencrypted; not readable by other users).  "
    "[default: GATEWAY_TLS_KEY]",
)
def serve(
    data_dir: str | None,
    upstream_url: str | None,
    global_cap: int | None,
    tls_cert: str | None,
    tls_key: str | None,
    queue_timeout: float | None,
    loop: str,
    http: str,
    metrics_port: int | None,
    metrics_host: str | None,
    host: str | None,
    port: str | None,
    workers: str | None,
    backlog: int,
    backpressure: int,
    worker_kill_timeout: int,
    worker_lifetime: int | None,
    worker_max_rss: int | None,
) -> None:
    """Start the gateway: check the settings, the address, the database and the master
    key; migrate; claim the IPC namespace; run Granian workers.

    Refuses to start (one error line, status 1) when any setting is invalid, the address
    is taken, or the master key does not decrypt a stored key. SIGHUP is ignored (the
    settings are read once: restart to change them); SIGTERM or Ctrl-C stops it.
    """
    from gateway.launcher import Launcher, LaunchError
    from gateway.tls import TLSConfigError, check_tls_files

    settings = _settings(
        discover=False,
        data_dir=data_dir,
        upstream_url=upstream_url,
        global_cap=global_cap,
        host=host,
        port=port,
        queue_timeout=queue_timeout,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )
    if settings.tls_cert is not None and settings.tls_key is not None:
        try:
            check_tls_files(settings.tls_cert, settings.tls_key)
        except TLSConfigError as exc:
            raise click.ClickException(str(exc)) from None
    try:
        worker_count = parse_int(
            workers,
            "GATEWAY_WORKERS",
            os.cpu_count() or 1,
            lo=1,
        )
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    options = GranianOptions(
        host=settings.host,
        port=settings.port,
        workers=worker_count,
        launcher_pid=os.getpid(),
        backlog=backlog,
        backpressure=backpressure,
        worker_kill_timeout=worker_kill_timeout,
        worker_lifetime=worker_lifetime,
        worker_max_rss=worker_max_rss,
        log_level=settings.log_level,
        loop=loop,
        http=http,
        tls_cert=str(settings.tls_cert) if settings.tls_cert else None,
        tls_key=str(settings.tls_key) if settings.tls_key else None,
    )
    base = f"{settings.scheme}://{settings.host}:{settings.port}"
    banner = (
        f"LLM gateway on {base} ({worker_count} workers, data in {settings.data_dir})\n"
        "  create a user (prints its token):  gateway users create alice\n"
        f"  store the user's Anthropic key:    curl -X PUT {base}/api/v1/me/anthropic-key \\\n"
        '      -H "Authorization: Bearer $TOKEN" -H "content-type: application/json" \\\n'
        '      -d \'{"key": "sk-ant-..."}\'\n'
        f"  Claude Code / Anthropic SDKs:      ANTHROPIC_BASE_URL={base} "
        "ANTHROPIC_API_KEY=$TOKEN"
        + (
            f"\n  Prometheus metrics:                "
            f"http://{settings.metrics_host}:{settings.metrics_port}/metrics"
            if settings.metrics_port
            else "\n  Prometheus metrics:                off (--metrics-port 0)"
        )
    )
    try:
        code = Launcher(settings, options).run(ready=lambda: click.echo(banner, err=True))
    except (IpcError, StorageError, LaunchError, SettingsError) as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


@main.command("migrate")
def migrate_command() -> None:
    """Create the data folder and apply all database migrations (idempotent)."""
    settings = _settings()

    async def nothing() -> None:
        return None

    _with_database(settings, nothing)
    click.echo("database is up to date")


@main.command()
def keygen() -> None:
    """Print a new random master key (base64 of 32 bytes) for GATEWAY_MASTER_KEY."""
    click.echo(MasterKey.generate().to_base64())


@main.group()
def keys() -> None:
    """The master keyring: stored keys per master key id, and rotating the master key."""


def _keyring(settings: Settings) -> tuple[Keyring, str]:
    from gateway.resources import resolve_keyring

    source = (
        "GATEWAY_MASTER_KEY"
        if settings.master_key is not None
        else f"file {settings.master_key_file}"
    )
    try:
        # The command line never makes a key file: that is the first `gateway serve`'s.
        return resolve_keyring(settings, create=False).current(), source
    except StorageError as exc:
        raise click.ClickException(str(exc)) from None


@keys.command("status")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per key id.")
def keys_status(as_json: bool) -> None:
    """How many stored Anthropic keys each master key id made, beside the keyring.

    A key id outside the keyring means keys no worker can decrypt; "none" counts keys
    stored before key ids (tried under every key of the ring).
    """
    settings = _settings()
    counts = _with_database(settings, repository.count_keys_by_key_id)
    keyring, source = _keyring(settings)
    ids: list[str | None] = [*keyring.key_ids]
    ids += sorted((key_id for key_id in counts if key_id not in ids and key_id), key=str)
    if None in counts:
        ids.append(None)
    rows = []
    for key_id in ids:
        if key_id is None:
            state = "made before key ids: tried under every key of the keyring"
        elif key_id == keyring.primary.key_id:
            state = "in the keyring, encrypts new keys"
        elif key_id in keyring:
            state = "in the keyring"
        else:
            state = "NOT in the keyring: these keys cannot be decrypted"
        rows.append((key_id, counts.get(key_id, 0), state))
    if as_json:
        for key_id, count, state in rows:
            click.echo(
                msgspec.json.encode({"key_id": key_id, "stored_keys": count, "state": state})
            )
        return
    click.echo(f"master keyring from {source}: {', '.join(keyring.key_ids)}")
    click.echo(f"{'key id':<10}  {'stored keys':>11}  state")
    for key_id, count, state in rows:
        click.echo(f"{key_id or 'none':<10}  {count:>11}  {state}")


@keys.command("rotate-master")
@click.option(
    "--new-key-env",
    metavar="NAME",
    default=None,
    help="The environment variable holding the new master key (base64, `gateway keygen`).",
)
@click.option(
    "--new-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A file holding the new master key (its first key: the keyring file itself does).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10_000),
    default=500,
    show_default=True,
    help="Stored keys re-encrypted per database transaction.",
)
def keys_rotate_master(new_key_env: str | None, new_key_file: Path | None, batch_size: int) -> None:
    """Re-encrypt every stored Anthropic key under the new master key, while serving.

    The new key must already come first in the gateway's keyring (GATEWAY_MASTER_KEY or
    the key file), with the old key after it, and the workers must hold it: see the
    README's "Rotating the master key". One transaction per batch; safe to run again.
    """
    from gateway.rotation import RotationError, check_new_key, rotate
    from storage.keyring import Keyring as ParsedKeyring

    if (new_key_env is None) == (new_key_file is None):
        raise click.UsageError("give one of --new-key-env NAME or --new-key-file PATH")
    try:
        if new_key_env is not None:
            raw = os.environ.get(new_key_env)
            if not raw:
                raise click.ClickException(f"the environment variable {new_key_env} is not set")
            new_key = ParsedKeyring.parse(raw, where=new_key_env).primary
            given = new_key_env
        else:
            assert new_key_file is not None
            new_key = read_keyring_file(new_key_file).primary
            given = str(new_key_file)
    except StorageError as exc:
        raise click.ClickException(str(exc)) from None
    settings = _settings()
    keyring, source = _keyring(settings)
    try:
        check_new_key(keyring, new_key, source=source)
    except RotationError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"re-encrypting stored keys under master key id {new_key.key_id} (from {given}), "
        f"{batch_size} per transaction"
    )

    def progress(batch: int, rewritten: int) -> None:
        click.echo(f"  batch {batch}: {rewritten} re-encrypted so far")

    report = _with_database(
        settings, lambda: rotate(keyring, batch_size=batch_size, progress=progress)
    )
    click.echo(f"re-encrypted {report.rewritten} stored keys under {report.key_id}")
    if report.failed:
        raise click.ClickException(
            f"{len(report.failed)} stored keys decrypt under no key of the keyring and were "
            f"left as they are (users {', '.join(report.failed)}): they need their key "
            "stored again"
        )
    click.echo(
        "every stored key is under the new master key: `gateway keys status` shows it; the "
        "old key may now leave the keyring"
    )


@main.group()
def users() -> None:
    """Create, list and delete gateway users."""


@users.command("create")
@click.argument("name")
@click.option("--label", default="first token", show_default=True, help="Label of the token.")
def users_create(name: str, label: str) -> None:
    """Create user NAME (1..64 of letters, digits and . _ - @) and issue its first token
    (printed alone on the last line)."""
    _refuse_bad(name_problem(name), label_problem(label))
    settings = _settings()

    async def work() -> tuple[repository.UserRecord, repository.TokenRecord, str]:
        user = await repository.create_user(name)
        record, token = await repository.issue_token(user.id, label=label)
        return user, record, token

    user, record, token = _with_database(settings, work)
    audit("user_created", source="cli", user=user.name, user_id=str(user.id))
    audit("token_issued", source="cli", user=user.name, token_id=record.id, label=label)
    click.echo(f"created user {user.name} ({user.id}); its gateway token (shown once):")
    click.echo(token)


class _UserRow(msgspec.Struct, frozen=True):
    id: str
    name: str
    created_at: str
    key: bool
    cap: int | None
    tokens: int  # usable now: neither revoked nor expired


@users.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per user.")
def users_list(as_json: bool) -> None:
    """List users: whether each has an Anthropic key stored, its cap, and its usable tokens."""
    settings = _settings()

    async def work() -> tuple[
        list[repository.UserRecord], list[repository.KeyCap], list[repository.TokenRecord]
    ]:
        return (
            await repository.list_users(),
            await repository.list_key_caps(),
            await repository.list_tokens(),
        )

    users_found, keys, token_records = _with_database(settings, work)
    caps = {key.user_id: key.max_concurrent for key in keys}
    now = datetime.now(UTC)
    usable: dict[uuid.UUID, int] = {}
    for record in token_records:
        if record.revoked_at is None and not record.expired(now):
            usable[record.user_id] = usable.get(record.user_id, 0) + 1
    rows = [
        _UserRow(
            id=str(user.id),
            name=user.name,
            created_at=_when(user.created_at),
            key=user.id in caps,
            cap=caps.get(user.id),
            tokens=usable.get(user.id, 0),
        )
        for user in users_found
    ]
    if as_json:
        for row in rows:
            click.echo(msgspec.json.encode(row))
        return
    header = ("name", "key", "cap", "tokens", "created", "id")
    cells = [
        (
            row.name,
            "yes" if row.key else "no",
            str(row.cap or "-"),
            str(row.tokens),
            row.created_at,
            row.id,
        )
        for row in rows
    ]
    for line in _columns(header, cells, right={2, 3}):
        click.echo(line)


@users.command("delete")
@click.argument("name")
def users_delete(name: str) -> None:
    """Delete user NAME with its tokens and key."""
    settings = _settings()
    _check_shared_gates(settings)

    async def work() -> repository.UserRecord | None:
        user = await repository.get_user(name)
        if user is not None and await repository.delete_user(name):
            return user
        return None

    user = _with_database(settings, work)
    if user is None:
        raise click.ClickException(f"no user named {name!r}")
    audit("user_deleted", source="cli", user=name, user_id=str(user.id))
    _announce_change(settings, deleted_user=user.id)
    click.echo(f"deleted user {name}")


@users.command("set-cap")
@click.argument("name")
@click.argument("cap", type=click.IntRange(1, 256))
def users_set_cap(name: str, cap: int) -> None:
    """Set user NAME's concurrency cap to CAP (1..256), as the settings API would.

    A running gateway applies it at once: a lowered cap counts the requests still in
    flight and admits nothing new until enough of them have ended.
    """
    settings = _settings()
    _check_shared_gates(settings)

    async def work() -> repository.KeyChange | None:
        user = await repository.get_user(name)
        if user is None:
            raise click.ClickException(f"no user named {name!r}")
        return await repository.update_cap(user.id, cap)

    change = _with_database(settings, work)
    if change is None:
        raise click.ClickException(
            f"user {name!r} has no Anthropic key stored; a cap needs a key "
            "(PUT /api/v1/me/anthropic-key)"
        )
    previous = change.previous.max_concurrent if change.previous is not None else None
    audit("cap_changed", source="cli", user=name, old_cap=previous, new_cap=cap)
    _announce_change(settings, cap_change=change)
    click.echo(f"cap of {name}: {previous} -> {cap}")


@main.group()
def tokens() -> None:
    """Issue, list and revoke gateway tokens."""


def _duration(value: str) -> timedelta:
    found = re.fullmatch(r"\s*(\d{1,6})\s*([dhms]?)\s*", value)
    if found is None or int(found.group(1)) == 0:
        raise click.BadParameter(
            "must be a positive number of days (90d), hours (12h), minutes (30m) or "
            f"seconds (45s), got {value!r}"
        )
    amount, unit = int(found.group(1)), found.group(2) or "d"
    units = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
    return timedelta(**{units[unit]: amount})


@tokens.command("issue")
@click.argument("name")
@click.option("--label", default="", help="A label to recognise the token by.")
@click.option(
    "--expires",
    default=None,
    metavar="DURATION",
    help="Stop accepting the token after this long: 90d, 12h, 30m, 45s  [default: never]",
)
def tokens_issue(name: str, label: str, expires: str | None) -> None:
    """Issue a new token for user NAME (printed alone on the last line)."""
    _refuse_bad(label_problem(label))
    try:
        lifetime = None if expires is None else _duration(expires)
    except click.BadParameter as exc:
        raise click.ClickException(f"--expires: {exc.message}") from None
    settings = _settings()
    expires_at = None if lifetime is None else datetime.now(UTC) + lifetime

    async def work() -> tuple[repository.TokenRecord, str]:
        user = await repository.get_user(name)
        if user is None:
            raise click.ClickException(f"no user named {name!r}")
        return await repository.issue_token(user.id, label=label, expires_at=expires_at)

    record, token = _with_database(settings, work)
    audit(
        "token_issued",
        source="cli",
        user=name,
        token_id=record.id,
        label=label,
        expires_at=None if expires_at is None else _when(expires_at),
    )
    until = "" if expires_at is None else f", valid until {_when(expires_at)}"
    click.echo(f"issued token {record.id} for {name}{until}; shown once:")
    click.echo(token)


class _TokenRow(msgspec.Struct, frozen=True):
    id: int
    user: str
    label: str
    state: str
    created_at: str
    last_used_at: str | None
    expires_at: str | None
    revoked_at: str | None


@tokens.command("list")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per token.")
def tokens_list(name: str | None, as_json: bool) -> None:
    """List tokens (of user NAME, or all): state, created, last used (recorded at most
    about once a minute), expiry."""
    settings = _settings()

    async def work() -> list[repository.TokenRecord]:
        if name is None:
            return await repository.list_tokens()
        user = await repository.get_user(name)
        if user is None:
            raise click.ClickException(f"no user named {name!r}")
        return await repository.list_tokens(user.id)

    now = datetime.now(UTC)
    rows = []
    for record in _with_database(settings, work):
        state = "revoked" if record.revoked_at else "expired" if record.expired(now) else "active"
        rows.append(
            _TokenRow(
                id=record.id,
                user=record.user_name,
                label=record.label,
                state=state,
                created_at=_when(record.created_at),
                last_used_at=None if record.last_used_at is None else _when(record.last_used_at),
                expires_at=None if record.expires_at is None else _when(record.expires_at),
                revoked_at=None if record.revoked_at is None else _when(record.revoked_at),
            )
        )
    if as_json:
        for row in rows:
            click.echo(msgspec.json.encode(row))
        return
    header = ("id", "user", "label", "state", "created", "last used", "expires")
    cells = [
        (
            str(row.id),
            row.user,
            row.label or "-",
            row.state,
            row.created_at,
            row.last_used_at or "never",
            row.expires_at or "never",
        )
        for row in rows
    ]
    for line in _columns(header, cells, right={0}):
        click.echo(line)


@tokens.command("revoke")
@click.argument("token_id", type=int)
def tokens_revoke(token_id: int) -> None:
    """Revoke token TOKEN_ID; running gateways refuse it on their next request."""
    settings = _settings()
    _check_shared_gates(settings)

    async def work() -> repository.TokenRecord | None:
        record = await repository.get_token(token_id)
        if record is None or not await repository.revoke_token(token_id):
            return None
        return record

    record = _with_database(settings, work)
    if record is None:
        raise click.ClickException(f"no active token with id {token_id}")
    audit("token_revoked", source="cli", user=record.user_name, token_id=token_id)
    _announce_change(settings)
    click.echo(f"revoked token {token_id}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per gateway.")
def status(as_json: bool) -> None:
    """The gateways running on this host: address, workers, namespace, database and
    data folder (exit status 1 when none runs)."""
    from gateway.instances import running_gateways

    found = running_gateways()
    if not found:
        raise click.ClickException("no running gateway found on this host")
    for gateway in found:
        info = gateway.info
        entry = {
            "url": f"http://{info.host}:{info.port}",
            "launcher_pid": gateway.launcher.pid,
            "workers": info.workers,
            "namespace": gateway.launcher.namespace,
            "database": redacted_url(info.database_url),
            "data_dir": info.data_dir,
            "started_at": info.started_at,
            "version": info.version,
        }
        if as_json:
            click.echo(msgspec.json.encode(entry))
            continue
        width = max(len(key) for key in entry)
        click.echo(f"gateway {entry['url']}")
        for key, value in entry.items():
            if key != "url":
                click.echo(f"  {key.replace('_', ' ').ljust(width)}  {value}")


def _refuse_bad(*problems: str | None) -> None:
    for problem in problems:
        if problem is not None:
            raise click.ClickException(problem)


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _columns(
    header: tuple[str, ...], cells: Sequence[tuple[str, ...]], *, right: set[int]
) -> list[str]:
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    return [
        "  ".join(
            line[i].rjust(widths[i]) if i in right else line[i].ljust(widths[i])
            for i in range(len(header))
        ).rstrip()
        for line in [header, *cells]
    ]


class _CapRow(msgspec.Struct, frozen=True):
    namespace: str
    name: str
    scope: str
    user_id: str | None
    user: str | None
    cap: int
    in_use: int
    free: int
    to_drain: int
    held_by_live_workers: int


def _cap_rows(namespace: str, keys: list[repository.KeyCap]) -> list[_CapRow]:
    """The global gate, then every credential with a stored key (open or not yet)."""
    held = held_by_ledgers(namespace)
    global_rows = [
        _CapRow(
            namespace=namespace,
            name=gate.name,
            scope="global",
            user_id=None,
            user=None,
            cap=gate.cap,
            in_use=gate.in_use,
            free=gate.free,
            to_drain=0,
            held_by_live_workers=held.get(gate.name, 0),
        )
        for gate in usage(namespace)
        if gate.scope == "global"
    ]
    credential_rows = []
    for key in keys:
        gate_name = credential_gate_name(namespace, key.user_id)
        state = read_state(namespace, key.user_id)
        cap = key.max_concurrent if state is None else state.cap
        in_use = 0 if state is None else state.in_use
        credential_rows.append(
            _CapRow(
                namespace=namespace,
                name=gate_name,
                scope="credential",
                user_id=str(key.user_id),
                user=key.user_name,
                cap=cap,
                in_use=in_use,
                free=max(0, cap - in_use),
                to_drain=max(0, in_use - cap),
                held_by_live_workers=held.get(gate_name, 0),
            )
        )
    credential_rows.sort(key=lambda row: (-row.in_use, row.user or ""))
    return global_rows + credential_rows


def _shared_cap_rows(
    prefix: str, global_cap: int | None, keys: list[repository.KeyCap], readings: list[CapReading]
) -> list[_CapRow]:
    """The shared gates as Redis holds them: live leases of every host. A credential no
    request has used since its last change shows the database's cap."""
    global_reading, *credential_readings = readings
    rows = []
    if global_cap is not None or global_reading.in_use:
        cap = global_cap if global_cap is not None else global_reading.in_use
        rows.append(
            _CapRow(
                namespace=prefix,
                name=f"{prefix}g",
                scope="global",
                user_id=None,
                user=None,
                cap=cap,
                in_use=global_reading.in_use,
                free=max(0, cap - global_reading.in_use),
                to_drain=max(0, global_reading.in_use - cap),
                held_by_live_workers=global_reading.in_use,
            )
        )
    credential_rows = []
    for key, reading in zip(keys, credential_readings, strict=True):
        cap = key.max_concurrent if reading.cap is None else reading.cap
        credential_rows.append(
            _CapRow(
                namespace=prefix,
                name=f"{prefix}c:{key.user_id.hex}",
                scope="credential",
                user_id=str(key.user_id),
                user=key.user_name,
                cap=cap,
                in_use=reading.in_use,
                free=max(0, cap - reading.in_use),
                to_drain=max(0, reading.in_use - cap),
                held_by_live_workers=reading.in_use,
            )
        )
    credential_rows.sort(key=lambda row: (-row.in_use, row.user or ""))
    return rows + credential_rows


def _shared_rows(settings: Settings) -> list[_CapRow]:
    assert settings.gates_url is not None
    keys = _with_database(settings, repository.list_key_caps)
    store = _shared_store(settings)

    async def work(client: Redis) -> tuple[int | None, list[CapReading]]:
        readings = await store.readings(client, [key.user_id for key in keys])
        return await store.global_cap(client), readings

    try:
        global_cap, readings = store.run(work)
    except GatesUnavailable as exc:
        raise click.ClickException(
            f"the coordination store {redacted_url(settings.gates_url.reveal())} does not "
            f"answer: {exc}"
        ) from None
    return _shared_cap_rows(settings.gates_prefix, global_cap, keys, readings)


def _shared_caps(settings: Settings, *, as_json: bool, watch: bool, interval: float) -> None:
    assert settings.gates_url is not None
    title = (
        f"caps shared through Redis {redacted_url(settings.gates_url.reveal())}, prefix "
        f"{settings.gates_prefix!r} (every host's requests in flight)"
    )
    if watch:
        from gateway.caps_watch import run_shared_watch  # rich: the command line only

        prefix = namespace_prefix(settings.database_url)
        run_shared_watch(
            lambda: _shared_rows(settings),
            lambda: running_namespaces(prefix, explicit=settings.ipc_namespace),
            interval=interval,
            as_json=as_json,
            title=title,
        )
        return
    rows = _shared_rows(settings)
    if as_json:
        for row in rows:
            click.echo(msgspec.json.encode(row))
        return
    click.echo(title)
    for line in _table(rows):
        click.echo(line)


def _table(rows: list[_CapRow]) -> list[str]:
    header = ("scope", "user", "cap", "in use", "free", "to drain")
    cells = [
        (
            row.scope,
            row.user or "-",
            str(row.cap),
            str(row.in_use),
            str(row.free),
            str(row.to_drain) if row.to_drain else "-",
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    lines = []
    for line in [header, *cells]:
        left = [line[i].ljust(widths[i]) for i in (0, 1)]
        right = [line[i].rjust(widths[i]) for i in range(2, len(header))]
        lines.append("  ".join(left + right).rstrip())
    return lines


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per gate.")
@click.option(
    "--namespace",
    envvar="GATEWAY_IPC_NAMESPACE",
    default=None,
    help="The IPC namespace of one gateway (default: every gateway running over this "
    "database, however its namespace was set).",
)
@click.option(
    "--port",
    type=int,
    default=None,
    help="Only the gateway whose default namespace is derived from this port.",
)
@click.option(
    "--watch",
    is_flag=True,
    help="Refresh every --interval seconds, in place on a terminal (like top), with each "
    "credential's rejections in the last minute; plain text (or --json lines) per refresh "
    "when not a terminal. Ctrl-C exits.",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes of --watch.",
)
def caps(
    as_json: bool, namespace: str | None, port: int | None, watch: bool, interval: float
) -> None:
    """Every gate of the running gateway: the global cap and each user's cap, in use,
    free, and requests still to drain after a lowered cap.

    Exits with status 1 when no running gateway is found. With Redis gates
    (GATEWAY_GATES_URL) it reads Redis: every host's requests in flight.
    """
    settings = _settings(port=port, ipc_namespace=namespace)
    if settings.gates_url is not None:
        _shared_caps(settings, as_json=as_json, watch=watch, interval=interval)
        return
    prefix = namespace_prefix(settings.database_url)

    def find() -> list[str]:
        if namespace is not None or port is not None:
            return [settings.ipc_namespace] if launcher_pid(settings.ipc_namespace) else []
        return running_namespaces(prefix)

    found = find()
    where = settings.ipc_namespace if namespace or port else f"database {settings.database_url}"
    if not found:
        raise click.ClickException(f"no running gateway found ({where}); is it running?")
    if watch:
        from gateway.caps_watch import run_watch  # rich: the command line only

        run_watch(settings.database_url, find, interval=interval, as_json=as_json, where=where)
        return
    keys = _with_database(settings, repository.list_key_caps)
    for index, running in enumerate(found):
        rows = _cap_rows(running, keys)
        if as_json:
            for row in rows:
                click.echo(msgspec.json.encode(row))
            continue
        if index:
            click.echo()
        click.echo(f"gateway namespace {running} (launcher pid {launcher_pid(running)})")
        for line in _table(rows):
            click.echo(line)
        repairs = repairs_made(running)
        click.echo(
            f"drift repairs since start: {sum(repairs.values())} "
            f"(global {repairs['global']}, credential {repairs['credential']})"
        )


main.add_command(usage_command)

if __name__ == "__main__":
    main()
