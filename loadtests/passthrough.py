"""The floor for the benchmark: a bare pass-through on the gateway's own parts, nothing else.

    python -m loadtests.passthrough --port 8090 --upstream http://127.0.0.1:9000 --workers 2

The same Granian server (ASGI, HTTP/1.1, uvloop) and the same upstream transport and
request building as the gateway, but no token, no key, no caps, no ledger, no metrics,
no access log, no header filtering: read the body, forward it with the client's headers
(``host`` dropped), relay the answer's bytes. ``python -m loadtests.benchmark`` prints its
worker CPU per request beside the gateway's, so the gateway's own share is visible. Not
a product: it must never face a network.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import click

from gateway.settings import Settings

Message = MutableMapping[str, Any]
# Not forwarded: the transport writes its own host and length; hop-by-hop headers.
_HOP = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection", b"keep-alive"})


class PassThrough:
    def __init__(self, upstream_url: str) -> None:
        from gateway.upstream import Upstream

        os.environ.setdefault("GATEWAY_UPSTREAM_URL", upstream_url)
        self.settings = Settings.from_env()
        self.upstream: Upstream | None = None

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    from gateway.upstream import Upstream

                    self.upstream = Upstream(self.settings)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self.upstream is not None:
                        await self.upstream.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert self.upstream is not None
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        target = scope["raw_path"] + (
            b"?" + scope["query_string"] if scope["query_string"] else b""
        )
        headers = [(k, v) for k, v in scope["headers"] if k not in _HOP]
        request = self.upstream.request(
            scope["method"], target, headers=headers, body=b"".join(chunks)
        )
        response = await self.upstream.send(request)
        try:
            out = [
                (k.lower(), v) for k, v in response.headers.raw if k.lower() != b"transfer-encoding"
            ]
            await send(
                {"type": "http.response.start", "status": response.status_code, "headers": out}
            )
            async for chunk in response.stream:  # type: ignore[union-attr]
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


def app_from_environment() -> PassThrough:
    return PassThrough(os.environ["PASSTHROUGH_UPSTREAM"])


@click.command()
@click.option("--port", type=int, required=True)
@click.option("--upstream", required=True)
@click.option("--workers", type=int, default=2, show_default=True)
def main(port: int, upstream: str, workers: int) -> None:
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.server import Server

    os.environ["PASSTHROUGH_UPSTREAM"] = upstream
    Server(
        "loadtests.passthrough:app_from_environment",
        factory=True,
        address="127.0.0.1",
        port=port,
        interface=Interfaces.ASGI,
        http=HTTPModes.http1,
        loop=Loops.uvloop,
        workers=workers,
        backlog=8192,
        backpressure=10_000,
        log_access=False,
        working_dir=Path.cwd(),
    ).serve()


if __name__ == "__main__":
    main()
