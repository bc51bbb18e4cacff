"""The probes' HTTP server when its port cannot be had: one typed error, no traceback."""

from __future__ import annotations

import asyncio
import socket

import pytest

from sidecar.errors import HttpPortUnavailable, RunnerError
from sidecar.http import MAX_HEAD_BYTES, HealthServer

pytestmark = pytest.mark.timeout(20)


def probe() -> tuple[bool, str]:
    return True, ""


async def test_a_busy_port_is_one_error_naming_the_variables() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = HealthServer("127.0.0.1", port, alive=probe, ready=probe)

        with pytest.raises(HttpPortUnavailable) as raised:
            await server.start()

    error = raised.value
    assert isinstance(error, RunnerError)
    assert (error.host, error.port) == ("127.0.0.1", port)
    assert str(error).startswith(
        f"cannot serve /healthz, /readyz and /metrics on 127.0.0.1:{port} "
        "(KRT_HTTP_HOST, KRT_HTTP_PORT): "
    )
    assert "address already in use" in str(error)
    assert "set KRT_HTTP_PORT to a free one" in str(error)
    assert "\n" not in str(error)


async def test_a_request_head_over_the_limit_is_refused() -> None:
    server = HealthServer("127.0.0.1", 0, alive=probe, ready=probe)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n")
        await writer.drain()
        reply = await reader.read()
        writer.close()
    finally:
        await server.close()

    assert reply.startswith(b"HTTP/1.1 400 Bad Request")
