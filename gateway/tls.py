"""TLS on the listener: the launcher's checks of the certificate and key before Granian."""

from __future__ import annotations

import ipaddress
import ssl
import stat
from pathlib import Path


class TLSConfigError(Exception):
    """The certificate or key cannot be served (the message says which file and why)."""


def check_tls_files(cert: Path, key: Path) -> None:
    """Refuse, with one line naming the file, what Granian would fail on later or what
    would leak: an unreadable file, a key that others may read, a pair that does not match.

    Granian loads the pair in every worker; a worker that cannot would die and be
    respawned in a loop, so the launcher finds out first, with Python's own ``ssl``.
    """
    for path, what in ((cert, "certificate"), (key, "key")):
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise TLSConfigError(
                f"cannot read the TLS {what} {path}: {exc.strerror or exc}"
            ) from None
    mode = key.stat().st_mode
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise TLSConfigError(
            f"the TLS key {key} is readable by other users (mode {stat.S_IMODE(mode):o}): "
            f"chmod o-rwx {key} (0600, or 0640 for a group such as ssl-cert)"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A password callback that gives none: an encrypted key fails here instead of
        # OpenSSL prompting on the terminal.
        context.load_cert_chain(str(cert), str(key), password=lambda: b"")
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in reason.upper():
            raise TLSConfigError(
                f"the TLS certificate {cert} does not match the key {key}"
            ) from None
        raise TLSConfigError(
            f"the TLS certificate {cert} or key {key} is not usable ({reason}); both must be "
            "PEM, the key unencrypted"
        ) from None
    except OSError as exc:
        raise TLSConfigError(f"cannot load the TLS certificate {cert}: {exc}") from None


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the listener to this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


CLEARTEXT_WARNING = (
    "listening on {host} without TLS: tokens travel in clear: put TLS or a TLS-terminating "
    "proxy in front (gateway serve --tls-cert/--tls-key, or see README 'Operating it')"
)
