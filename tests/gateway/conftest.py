"""One `gateway serve` (two workers, SQLite) shared by a test module, for behaviour tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from loadtests.fake_upstream import FakeUpstream
from tests.fixtures.gateway import GatewayProcess, base_env, fresh_namespace, serving


@pytest.fixture(scope="module")
def shared_gateway(
    tmp_path_factory: pytest.TempPathFactory, fake_upstream: FakeUpstream
) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("gateway")
    with fresh_namespace() as namespace:
        env = base_env(
            tmp / "data",
            database_url=f"sqlite:///{tmp / 'gateway.sqlite3'}",
            namespace=namespace,
            upstream_url=fake_upstream.url,
        )
        with serving(env, workers=2, log_dir=tmp) as gateway:
            yield gateway
