"""HTTPS on the listener through Granian's own TLS: the SDK, raw SSE and the caps over it,
and the files the launcher refuses before it serves anything."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import anthropic
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.tls import is_loopback
from tests.fixtures.gateway import GatewayProcess, held_streams, run_cli

TRACE_MARKERS = ("Traceback", 'File "')


def write_self_signed(directory: Path, *, name: str = "gateway") -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, signed by its own key (so it is also
    the one certificate a client trusts), with the key file at mode 0600."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.chmod(0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    return write_self_signed(tmp_path / "tls")


@pytest.fixture
def https_gateway(
    start_gateway: Callable[..., GatewayProcess], tls_files: tuple[Path, Path]
) -> Iterator[GatewayProcess]:
    cert, key = tls_files
    yield start_gateway(workers=2, GATEWAY_TLS_CERT=str(cert), GATEWAY_TLS_KEY=str(key))


def client_context(gateway: GatewayProcess) -> ssl.SSLContext:
    assert isinstance(gateway.verify, ssl.SSLContext)
    return gateway.verify


def test_the_sdk_and_raw_sse_over_https_through_two_workers(
    https_gateway: GatewayProcess,
) -> None:
    gateway = https_gateway
    assert gateway.url.startswith("https://")
    token, upstream_key = gateway.user_with_key(f"tls{uuid.uuid4().hex[:8]}", cap=2)

    # Plain HTTP to the TLS port is no way in: nothing is served in clear.
    with pytest.raises(httpx.HTTPError):
        httpx.get(gateway.url.replace("https://", "http://") + "/healthz", timeout=5)
    # A client that does not trust the certificate is refused by its own TLS check.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{gateway.url}/healthz", timeout=5)

    for _ in range(4):  # a new client (connection, TLS handshake) each: both workers
        with anthropic.Anthropic(
            base_url=gateway.url,
            api_key=token,
            max_retries=0,
            http_client=anthropic.DefaultHttpxClient(verify=client_context(gateway)),
        ) as client:
            message = client.messages.create(
                model="claude-test",
                max_tokens=16,
                messages=[{"role": "user", "content": "hello"}],
            )
            assert message.content[0].type == "text"
            with client.messages.stream(
                model="claude-test",
                max_tokens=16,
                messages=[{"role": "user", "content": "hello"}],
                extra_query={"events": "3"},
            ) as stream:
                texts = list(stream.text_stream)
            assert len(texts) == 3
        echoed = httpx.get(
            f"{gateway.url}/v1/echo",
            headers={"x-api-key": token},
            timeout=10,
            verify=client_context(gateway),
        )
        assert echoed.json()["headers"]["x-api-key"] == upstream_key

    # Raw SSE over HTTPS: the bytes arrive event by event, framed as SSE.
    body = {"model": "claude-test", "max_tokens": 16, "stream": True, "messages": []}
    with (
        httpx.Client(verify=client_context(gateway), timeout=30) as client,
        client.stream(
            "POST",
            f"{gateway.url}/v1/messages?events=5",
            json=body,
            headers={"x-api-key": token},
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_raw())
    events = [block for block in raw.split(b"\n\n") if block.strip()]
    assert events[0].startswith(b"event: message_start")
    assert events[-1].startswith(b"event: message_stop")


def test_the_caps_hold_over_https(https_gateway: GatewayProcess) -> None:
    gateway = https_gateway
    token, _key = gateway.user_with_key(f"tls{uuid.uuid4().hex[:8]}", cap=2)
    with held_streams(gateway, token, 2):
        for _ in range(4):  # each on a new connection: both workers refuse the third
            response = httpx.get(
                f"{gateway.url}/v1/models",
                headers={"x-api-key": token},
                timeout=10,
                verify=client_context(gateway),
            )
            assert response.status_code == 429, response.text
            assert response.json()["error"]["type"] == "overloaded_error"
            assert response.headers["retry-after"]
    response = httpx.get(
        f"{gateway.url}/v1/models",
        headers={"x-api-key": token},
        timeout=10,
        verify=client_context(gateway),
    )
    assert response.status_code == 200


# -- refused at start -----------------------------------------------------------------


def serve_refused(env: dict[str, str], *args: str) -> str:
    """``gateway serve`` that must stop at once with one line and status 1."""
    result = run_cli(env, "serve", "--port", "1", "--workers", "1", *args, check=False)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for marker in TRACE_MARKERS:
        assert marker not in result.stderr
    return lines[0]


def test_a_key_readable_by_others_is_refused(
    gateway_env: dict[str, str], tls_files: tuple[Path, Path]
) -> None:
    cert, key = tls_files
    key.chmod(0o644)
    line = serve_refused(gateway_env, "--tls-cert", str(cert), "--tls-key", str(key))
    assert line.startswith("Error: the TLS key")
    assert "readable by other users" in line and str(key) in line
    # The environment's way is checked the same.
    line = serve_refused(
        {**gateway_env, "GATEWAY_TLS_CERT": str(cert), "GATEWAY_TLS_KEY": str(key)}
    )
    assert "readable by other users" in line


def test_a_certificate_that_does_not_match_its_key_is_refused(
    gateway_env: dict[str, str], tmp_path: Path
) -> None:
    cert, _key = write_self_signed(tmp_path / "one", name="one")
    _cert, other_key = write_self_signed(tmp_path / "two", name="two")
    line = serve_refused(gateway_env, "--tls-cert", str(cert), "--tls-key", str(other_key))
    assert line == f"Error: the TLS certificate {cert} does not match the key {other_key}"


def test_unreadable_or_half_given_files_are_refused(
    gateway_env: dict[str, str], tls_files: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = tls_files
    missing = tmp_path / "nowhere.key"
    line = serve_refused(gateway_env, "--tls-cert", str(cert), "--tls-key", str(missing))
    assert line.startswith(f"Error: cannot read the TLS key {missing}")
    line = serve_refused(gateway_env, "--tls-cert", str(tmp_path), "--tls-key", str(key))
    assert f"TLS certificate {tmp_path}" in line
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    line = serve_refused(gateway_env, "--tls-cert", str(not_pem), "--tls-key", str(key))
    assert "is not usable" in line
    line = serve_refused(gateway_env, "--tls-cert", str(cert))
    assert "GATEWAY_TLS_KEY" in line


def test_a_non_loopback_address_without_tls_warns_once(
    gateway_env: dict[str, str], tls_files: tuple[Path, Path]
) -> None:
    # The master key is malformed on purpose: the launcher stops right after its start
    # checks, before it binds anything, so no test listens beyond loopback.
    env = {**gateway_env, "GATEWAY_MASTER_KEY": "not-a-key"}
    result = run_cli(env, "serve", "--host", "0.0.0.0", "--workers", "1", check=False)
    assert result.returncode == 1
    warnings = [line for line in result.stderr.splitlines() if "travel in clear" in line]
    assert len(warnings) == 1, result.stderr
    assert "put TLS or a TLS-terminating proxy in front" in warnings[0]
    # With TLS, or on loopback, not a word of it.
    cert, key = tls_files
    with_tls = run_cli(
        env,
        "serve",
        "--host",
        "0.0.0.0",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--workers",
        "1",
        check=False,
    )
    loopback = run_cli(env, "serve", "--host", "127.0.0.1", "--workers", "1", check=False)
    for result in (with_tls, loopback):
        assert result.returncode == 1
        assert "travel in clear" not in result.stderr
        assert "master key" in result.stderr


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("gateway.internal", False),
    ],
)
def test_which_addresses_count_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
