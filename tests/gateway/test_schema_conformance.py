"""The settings API against its own OpenAPI schema: a bounded schemathesis run with every
check (status codes and bodies as documented, schema-valid input accepted, invalid input
refused, Allow on 405, ...) must find nothing."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests.fake_upstream import FakeUpstream
from tests.fixtures.gateway import GatewayProcess, module_gateway

# Enough to reach every documented status of the five operations (measured: 244 cases
# in about 6 s at 50); fixed seeds keep a failure reproducible.
MAX_EXAMPLES = 50
SEEDS = (2, 13)


@pytest.fixture(scope="module")
def schema_gateway(
    tmp_path_factory: pytest.TempPathFactory, fake_upstream: FakeUpstream
) -> Iterator[GatewayProcess]:
    with module_gateway(tmp_path_factory.mktemp("schema"), fake_upstream.url) as gateway:
        yield gateway


@pytest.mark.parametrize("seed", SEEDS)
def test_schemathesis_finds_nothing(
    schema_gateway: GatewayProcess, tmp_path: Path, seed: int
) -> None:
    token = schema_gateway.create_user(f"schema{seed}")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{schema_gateway.url}/schema/openapi.json",
            "--checks",
            "all",
            "--header",
            f"Authorization: Bearer {token}",
            "--include-path-regex",
            "^/(api/v1/me/anthropic-key|healthz)$",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            str(seed),
            "--request-timeout",
            "10",
            "--no-color",
        ],
        cwd=tmp_path,  # its .hypothesis folder and reports land here
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout
    # Every selected operation was really exercised.
    assert "Tested: 5" in result.stdout, result.stdout[-3000:]
