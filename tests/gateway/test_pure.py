"""The gateway's pure functions: header rules, upstream URLs and traversal, settings."""

from __future__ import annotations

import logging
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import InvalidRequest, error_body
from gateway.headers import client_response_headers, gateway_token, upstream_request_headers
from gateway.paths import has_traversal, upstream_target
from gateway.settings import (
    Secret,
    Settings,
    SettingsError,
    default_namespace,
    namespace_prefix,
    parse_global_cap,
    redacted_url,
)
from gateway.upstream import Upstream
from ipc.naming import validate_namespace

# -- headers ----------------------------------------------------------------------------


def test_request_headers_keep_the_allow_list_and_inject_the_key() -> None:
    client = [
        (b"Accept", b"application/json"),
        (b"anthropic-version", b"2023-06-01"),
        (b"anthropic-beta", b"a,b"),
        (b"content-type", b"application/json"),
        (b"user-agent", b"sdk/1"),
        (b"authorization", b"Bearer gwt_x"),
        (b"x-api-key", b"gwt_x"),
        (b"cookie", b"a=b"),
        (b"x-forwarded-for", b"10.0.0.1"),
        (b"connection", b"keep-alive"),
        (b"host", b"gateway"),
    ]
    out = upstream_request_headers(client, api_key="sk-ant-test-1")
    assert out == [
        (b"Accept", b"application/json"),
        (b"anthropic-version", b"2023-06-01"),
        (b"anthropic-beta", b"a,b"),
        (b"content-type", b"application/json"),
        (b"user-agent", b"sdk/1"),
        (b"x-api-key", b"sk-ant-test-1"),
    ]


def test_request_header_values_outside_ascii_stay_raw_bytes() -> None:
    client = [(b"user-agent", "\u2713 client".encode()), (b"anthropic-beta", b"caf\xe9")]
    assert upstream_request_headers(client, api_key="sk-ant-test-1")[:2] == client


def test_response_headers_keep_content_ids_retry_hints_and_anthropic_ones() -> None:
    upstream = [
        (b"Content-Type", b"text/event-stream"),
        (b"request-id", b"req_1"),
        (b"anthropic-ratelimit-requests-remaining", b"9"),
        (b"retry-after", b"3"),
        (b"x-should-retry", b"true"),
        (b"set-cookie", b"cdn=1"),
        (b"connection", b"keep-alive"),
        (b"transfer-encoding", b"chunked"),
        (b"content-length", b"12"),
        (b"server", b"cdn"),
    ]
    assert client_response_headers(upstream) == [
        (b"content-type", b"text/event-stream"),
        (b"request-id", b"req_1"),
        (b"anthropic-ratelimit-requests-remaining", b"9"),
        (b"retry-after", b"3"),
        (b"x-should-retry", b"true"),
    ]


@pytest.mark.parametrize(
    ("headers", "token"),
    [
        ([(b"x-api-key", b"gwt_a")], "gwt_a"),
        ([(b"authorization", b"Bearer gwt_b")], "gwt_b"),
        ([(b"authorization", b"bearer  gwt_c ")], "gwt_c"),
        ([(b"authorization", b"Bearer gwt_b"), (b"x-api-key", b"gwt_a")], "gwt_a"),
        ([(b"authorization", b"Basic abc")], None),
        ([(b"x-api-key", b"  ")], None),
        ([], None),
    ],
)
def test_gateway_token(headers: list[tuple[bytes, bytes]], token: str | None) -> None:
    assert gateway_token(headers) == token


def test_error_body_is_the_anthropic_envelope() -> None:
    assert error_body("overloaded_error", "busy") == (
        b'{"type":"error","error":{"type":"overloaded_error","message":"busy"}}'
    )


# -- paths ------------------------------------------------------------------------------


def test_upstream_target_keeps_path_and_query_verbatim() -> None:
    assert (
        upstream_target(b"/v1/files/a%3Fb%2Fc", b"x=%2F&y=a+b")
        == b"/v1/files/a%3Fb%2Fc?x=%2F&y=a+b"
    )
    assert upstream_target(b"/v1/messages", b"") == b"/v1/messages"
    assert upstream_target(b"/v1/./x//y/%2e/z", b"q=.") == b"/v1/./x//y/%2e/z?q=."


@pytest.mark.parametrize(("path", "query"), [(b"/v1/caf\xc3\xa9", b""), (b"/v1/x", b"q=\xe9")])
def test_a_target_outside_ascii_is_refused_naming_the_rule(path: bytes, query: bytes) -> None:
    with pytest.raises(InvalidRequest, match="must be ASCII: percent-encode"):
        upstream_target(path, query)


@pytest.mark.parametrize(
    "path",
    [
        b"/v1/../x",
        b"/v1/%2e%2e/x",
        b"/v1/%2E%2e/x",
        b"/v1/a/%252e%252e/b",
        b"/v1/a%2F..%2Fb",
        b"/v1/a\\..\\b",
        b"/v1/..",
    ],
)
def test_traversal_is_refused(path: bytes) -> None:
    assert has_traversal(path)
    with pytest.raises(InvalidRequest):
        upstream_target(path, b"")


@pytest.mark.parametrize("path", [b"/v1/messages", b"/v1/a..b", b"/v1/...", b"/v1/.x", b"/v1/%2e"])
def test_dots_that_are_not_a_parent_segment_pass(path: bytes) -> None:
    assert not has_traversal(path)


_segment = st.text(
    alphabet=st.characters(blacklist_characters="/\\%", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=12,
).filter(lambda s: s != "..")


@given(st.lists(_segment, min_size=1, max_size=5), st.integers(0, 5), st.integers(0, 2))
def test_any_encoding_of_a_parent_segment_is_found(
    segments: list[str], where: int, times: int
) -> None:
    dots = "%2e%2e" if times else ".."
    for _ in range(times - 1):
        dots = quote(dots, safe="")  # %2e -> %252e -> %25252e
    parts = [quote(s, safe="") for s in segments]
    parts.insert(min(where, len(parts)), dots)
    assert has_traversal(("/v1/" + "/".join(parts)).encode())


@given(st.lists(_segment, min_size=1, max_size=5))
def test_paths_without_a_parent_segment_pass(segments: list[str]) -> None:
    assert not has_traversal(("/v1/" + "/".join(quote(s, safe="") for s in segments)).encode())


# -- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "cap"), [(None, None), ("64", 64), (" 8 ", 8)])
def test_global_cap(raw: str | None, cap: int | None) -> None:
    assert parse_global_cap(raw) == cap


@pytest.mark.parametrize("raw", ["0", "-1", "", "many", "1.5"])
def test_invalid_global_cap_warns_and_means_none(
    raw: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.settings"):
        assert parse_global_cap(raw) is None
    assert "running without a global cap" in caplog.text


def test_default_namespace_differs_by_database_and_port_and_is_valid(tmp_path: object) -> None:
    a = default_namespace("sqlite:////srv/a/gateway.sqlite3", 8080)
    b = default_namespace("sqlite:////srv/b/gateway.sqlite3", 8080)
    c = default_namespace("sqlite:////srv/a/gateway.sqlite3", 8081)
    d = default_namespace("postgresql://u:secret@db:5432/gw", 8080)
    assert len({a, b, c, d}) == 4
    for namespace in (a, b, c, d):
        assert validate_namespace(namespace) == namespace
    assert a.startswith(namespace_prefix("sqlite:////srv/a/gateway.sqlite3"))
    assert c.startswith(namespace_prefix("sqlite:////srv/a/gateway.sqlite3"))
    # the password is not part of the database's identity
    assert d == default_namespace("postgresql://u:other@db:5432/gw", 8080)


def test_settings_from_env_defaults_and_errors(tmp_path: object) -> None:
    settings = Settings.from_env({"GATEWAY_DATA_DIR": "/srv/gw"})
    assert settings.database_url == "sqlite:////srv/gw/gateway.sqlite3"
    assert settings.upstream_url == "https://api.anthropic.com"
    assert settings.upstream_read_timeout == 600.0
    assert settings.max_global_concurrent is None
    assert settings.ipc_namespace == default_namespace(settings.database_url, 8080)
    with pytest.raises(SettingsError, match="GATEWAY_DATABASE_URL"):
        Settings.from_env({"GATEWAY_DATABASE_URL": "mysql://x"})
    with pytest.raises(SettingsError, match="GATEWAY_PORT"):
        Settings.from_env({"GATEWAY_PORT": "http"})
    with pytest.raises(SettingsError, match="GATEWAY_UPSTREAM_READ_TIMEOUT"):
        Settings.from_env({"GATEWAY_UPSTREAM_READ_TIMEOUT": "-3"})
    with pytest.raises(SettingsError, match="GATEWAY_UPSTREAM_READ_TIMEOUT: must be positive"):
        Settings.from_env({"GATEWAY_UPSTREAM_READ_TIMEOUT": "0"})
    assert settings.heap_trim_interval == 1.0
    assert Settings.from_env({"GATEWAY_HEAP_TRIM_INTERVAL": "0"}).heap_trim_interval == 0
    for bad in ("-1", "soon", "nan", "inf"):
        with pytest.raises(SettingsError, match="GATEWAY_HEAP_TRIM_INTERVAL"):
            Settings.from_env({"GATEWAY_HEAP_TRIM_INTERVAL": bad})
    assert settings.upstream_transport == "h1"
    for kind in ("h1", "aiohttp", "httpx"):
        assert Settings.from_env({"GATEWAY_UPSTREAM_TRANSPORT": kind}).upstream_transport == kind
    with pytest.raises(SettingsError, match="GATEWAY_UPSTREAM_TRANSPORT: must be one of h1"):
        Settings.from_env({"GATEWAY_UPSTREAM_TRANSPORT": "curl"})
    assert settings.request_body_timeout == 30.0
    assert Settings.from_env({"GATEWAY_REQUEST_BODY_TIMEOUT": "2.5"}).request_body_timeout == 2.5
    for bad in ("0", "-1", "slow", "nan"):
        with pytest.raises(SettingsError, match="GATEWAY_REQUEST_BODY_TIMEOUT"):
            Settings.from_env({"GATEWAY_REQUEST_BODY_TIMEOUT": bad})


def test_metrics_settings_and_the_workers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.launcher import worker_environment
    from ipc.naming import metrics_dir

    base = {"GATEWAY_DATA_DIR": "/srv/gw", "GATEWAY_IPC_NAMESPACE": "gwtest"}
    settings = Settings.from_env(base)
    assert (settings.metrics_host, settings.metrics_port) == ("127.0.0.1", 9464)
    assert settings.metrics_dir is None
    assert Settings.from_env({**base, "GATEWAY_METRICS_PORT": "0"}).metrics_port == 0
    # The flag wins over the environment, 0 included.
    assert (
        Settings.from_env({**base, "GATEWAY_METRICS_PORT": "9000"}, metrics_port=0).metrics_port
        == 0
    )
    assert Settings.from_env(base, metrics_port=9100, metrics_host="::1").metrics_host == "::1"
    for bad in ("-1", "metrics", "70000"):
        with pytest.raises(SettingsError, match="GATEWAY_METRICS_PORT"):
            Settings.from_env({**base, "GATEWAY_METRICS_PORT": bad})
    # On: the workers count into the namespace's folder; off: they count nothing, whatever
    # the launcher's own environment held.
    environment = worker_environment(settings)
    assert environment["PROMETHEUS_MULTIPROC_DIR"] == str(metrics_dir("gwtest"))
    worker = Settings.from_env(environment)
    assert worker.metrics_dir == metrics_dir("gwtest")
    off = Settings.from_env({**base, "GATEWAY_METRICS_PORT": "0"})
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/somewhere/else")
    assert "PROMETHEUS_MULTIPROC_DIR" not in worker_environment(off)


@pytest.mark.parametrize(
    ("base", "prefix"), [("http://u", b""), ("http://u/anthropic", b"/anthropic")]
)
async def test_upstream_requests_carry_the_target_verbatim_on_one_parsed_base(
    base: str, prefix: bytes
) -> None:
    upstream = Upstream(Settings.from_env({"GATEWAY_DATA_DIR": "/srv/gw"}, upstream_url=base))
    try:
        first = upstream.request("POST", b"/v1/./messages?beta=true", headers=[], body=b"")
        again = upstream.request("GET", b"/v1//files/%2e", headers=[], body=b"")
        assert first.url == again.url == upstream.base
        assert first.extensions["target"] == prefix + b"/v1/./messages?beta=true"
        assert again.extensions["target"] == prefix + b"/v1//files/%2e"
    finally:
        await upstream.aclose()


def test_secrets_never_print() -> None:
    secret = Secret("c2VjcmV0")
    settings = Settings.from_env({"GATEWAY_MASTER_KEY": "c2VjcmV0"})
    assert "c2VjcmV0" not in repr(secret) + str(secret) + repr(settings)
    assert secret.reveal() == "c2VjcmV0"


def test_gates_settings() -> None:
    default = Settings.from_env({})
    assert (default.shared_gates, default.gates_prefix, default.lease_seconds) == (
        False,
        "gateway:",
        15.0,
    )
    assert not Settings.from_env({"GATEWAY_GATES_URL": "posix:"}).shared_gates
    shared = Settings.from_env(
        {
            "GATEWAY_GATES_URL": "rediss://:hunter2@redis.internal:6380/3",
            "GATEWAY_GATES_PREFIX": "team-a:",
            "GATEWAY_LEASE_SECONDS": "5",
        }
    )
    assert shared.shared_gates and shared.gates_prefix == "team-a:" and shared.lease_seconds == 5
    assert shared.gates_url is not None
    assert "hunter2" not in repr(shared) and "hunter2" not in str(shared.gates_url)
    assert redacted_url(shared.gates_url.reveal()) == "rediss://:***@redis.internal:6380/3"
    for bad, rule in (
        ("memcached://x", "must be posix: or a redis://"),
        ("redis://", "must name a host"),
        ("redis://h:99999/0", "must be a valid URL"),
        ("redis://h/zero", "database must be a number"),
    ):
        with pytest.raises(SettingsError, match=f"GATEWAY_GATES_URL.*{rule}"):
            Settings.from_env({"GATEWAY_GATES_URL": bad})
    with pytest.raises(SettingsError, match="GATEWAY_GATES_PREFIX"):
        Settings.from_env({"GATEWAY_GATES_PREFIX": "has space"})
    for bad in ("0", "0.1", "-2", "soon"):
        with pytest.raises(SettingsError, match="GATEWAY_LEASE_SECONDS"):
            Settings.from_env({"GATEWAY_LEASE_SECONDS": bad})


def test_every_setting_error_names_the_variable_the_rule_and_the_value() -> None:
    cases = {
        "GATEWAY_LOG_LEVEL": ("verbose", "must be one of INFO, DEBUG", "'verbose'"),
        "GATEWAY_UPSTREAM_URL": ("not-a-url", "must be an http:// or https:// URL", "'not-a-url'"),
        "GATEWAY_HOST": ("", None, None),  # empty: the default applies
        "GATEWAY_PORT": ("x", "must be an integer", "'x'"),
        "GATEWAY_RETRY_AFTER": ("-1", "must be at least 0", "-1"),
        "GATEWAY_TOKEN_USE_INTERVAL": ("never", "must be a number of seconds", "'never'"),
    }
    for variable, (value, rule, shown) in cases.items():
        if rule is None:
            Settings.from_env({variable: value})
            continue
        with pytest.raises(SettingsError) as caught:
            Settings.from_env({variable: value})
        assert str(caught.value).startswith(f"{variable}: {rule}"), caught.value
        assert f"got {shown}" in str(caught.value)
    assert Settings.from_env({"GATEWAY_LOG_LEVEL": "debug"}).log_level == "DEBUG"
    assert Settings.from_env({"GATEWAY_UPSTREAM_URL": "http://h:1/base/"}).upstream_url == (
        "http://h:1/base"
    )
    assert Settings.from_env({}, global_cap=5).max_global_concurrent == 5


def test_the_name_and_label_rules() -> None:
    from storage.names import label_problem, name_problem

    for good in ("a", "alice", "x" * 64, "ops.bot-1_@corp"):
        assert name_problem(good) is None
    for bad in ("", " ", "a b", "a\tb", "a\nb", "x" * 65, "é", "a/b"):
        problem = name_problem(bad)
        assert problem is not None and problem.startswith("name: must be 1..64 characters")
    assert label_problem("") is None and label_problem("CI runner #3") is None
    for bad in ("a\tb", "a\nb", "y" * 101):
        assert label_problem(bad) is not None
