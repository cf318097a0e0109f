"""One `gateway serve` (two workers, SQLite) shared by a test module, for behaviour tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from loadtests.fake_upstream import FakeUpstream
from tests.fixtures.gateway import GatewayProcess, module_gateway


@pytest.fixture(scope="module")
def shared_gateway(
    tmp_path_factory: pytest.TempPathFactory, fake_upstream: FakeUpstream
) -> Iterator[GatewayProcess]:
    with module_gateway(tmp_path_factory.mktemp("gateway"), fake_upstream.url) as gateway:
        yield gateway
