"""The rule for user names and token labels, shared by the command line, the repository
and (as a check or trigger) the database, so both engines accept exactly the same."""

from __future__ import annotations

import re
from typing import Final

NAME_MAX: Final = 64
NAME_RULE: Final = f"must be 1..{NAME_MAX} characters of letters, digits and . _ - @"
# ASCII only: \w would admit any Unicode letter, and names appear in logs and metrics.
_NAME: Final = re.compile(rf"[A-Za-z0-9._@-]{{1,{NAME_MAX}}}")

LABEL_MAX: Final = 100
LABEL_RULE: Final = f"must be at most {LABEL_MAX} characters, with no control characters"
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


def name_problem(name: str) -> str | None:
    """None when ``name`` is a valid user name, else the rule and the value."""
    if _NAME.fullmatch(name):
        return None
    return f"name: {NAME_RULE}, got {name!r}"


def label_problem(label: str) -> str | None:
    if len(label) <= LABEL_MAX and not _CONTROL.search(label):
        return None
    shown = label if len(label) <= 40 else label[:40] + "..."
    return f"label: {LABEL_RULE}, got {shown!r}"
