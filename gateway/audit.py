"""The audit trail: one JSON log line per change an operator may be asked about.

Key stored, rotated or removed, cap changed, token issued or revoked, user created or
deleted; each names the event, the user, what changed and where it came from (``api``:
the settings API, ``cli``: the command line). Never a key or a token: only token ids.
"""

from __future__ import annotations

import logging
from typing import Literal

log = logging.getLogger("gateway.audit")

Source = Literal["api", "cli"]


def audit(event: str, *, source: Source, user: str | None, **fields: object) -> None:
    log.info(
        "audit: %s",
        event,
        extra={"audit": True, "event": event, "source": source, "user": user, **fields},
    )
