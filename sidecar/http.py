"""A minimal HTTP server for the kubelet and Prometheus: /healthz, /readyz, /metrics.

Plain `asyncio.start_server`, no framework: three GET routes, one response per
connection (`Connection: close`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from sidecar import metrics
from sidecar.errors import HttpPortUnavailable

log = logging.getLogger(__name__)

READ_TIMEOUT = 5.0
MAX_HEAD_BYTES = 8192

Probe = Callable[[], tuple[bool, str]]


class HealthServer:
    """Serves the probes. `alive` and `ready` return (ok, short reason)."""

    def __init__(self, host: str, port: int, alive: Probe, ready: Probe) -> None:
        self.host = host
        self.port = port
        self._alive = alive
        self._ready = ready
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen; HttpPortUnavailable when the port is taken or the host is not ours."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, limit=MAX_HEAD_BYTES
            )
        except OSError as exc:
            raise HttpPortUnavailable(self.host, self.port, exc.strerror or str(exc)) from exc
        # Port 0 means "any free port": report the one the kernel picked.
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("health and metrics on http://%s:%d", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            status, content_type, body = self._route(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            status, content_type, body = "400 Bad Request", "text/plain", b"bad request\n"
        except ConnectionError:
            writer.close()
            return
        try:
            writer.write(_response(status, content_type, body))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _route(self, head: bytes) -> tuple[str, str, bytes]:
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3:
            return "400 Bad Request", "text/plain", b"bad request\n"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"only GET\n"
        if target == "/metrics":
            # generate_latest writes text format 0.0.4, the label prometheus_client's own
            # server gives it (its CONTENT_TYPE_LATEST names 1.0.0).
            return "200 OK", CONTENT_TYPE_PLAIN_0_0_4, generate_latest(metrics.REGISTRY)
        probes = {"/healthz": self._alive, "/readyz": self._ready}
        probe = probes.get(target)
        if probe is None:
            return "404 Not Found", "text/plain", b"not found\n"
        ok, reason = probe()
        status = "200 OK" if ok else "503 Service Unavailable"
        return status, "text/plain", f"{reason}\n".encode()


def _response(status: str, content_type: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body
