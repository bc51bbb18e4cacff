"""The handler host's ``/metrics`` endpoint: an HTTP server whose cost is bounded.

prometheus_client's own server gives every connection a thread of its own, with no
timeout: idle connections held open pile up threads for as long as the peer likes. Here
one daemon thread runs an event loop of its own: an open connection costs a socket and a
coroutine, at most ``max_connections`` of them (past that, the one idle the longest is
closed for the newcomer), and one that has not sent its request within ``read_timeout``
seconds is closed. Its own loop, not the host's: a handler that blocks the host's event
loop (or a long sync ``init``) must not stop Prometheus from seeing the process.

One GET route, one response per connection (``Connection: close``), as the sidecar's
``sidecar/http.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

logger = logging.getLogger(__name__)

READ_TIMEOUT = 5.0
MAX_CONNECTIONS = 64
MAX_HEAD_BYTES = 8192
THREAD_NAME = "kre-metrics-http"


class ScrapeServer:
    """Serves ``registry`` on ``host:port`` from one thread; ``start()``, then ``close()``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        read_timeout: float = READ_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=THREAD_NAME, daemon=True
        )
        self._server: asyncio.Server | None = None
        # Each open connection's task and writer; the idle ones (no request yet) oldest
        # first, as a dict keeps them.
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._idle: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def start(self) -> None:
        """Listen (OSError when the port cannot be bound) and serve from the thread."""
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result()
        except BaseException:
            self._stop_loop()
            raise

    def close(self) -> None:
        """Stop listening, close every connection, end the thread. Blocks briefly."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(RuntimeError):  # the loop stopped already
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(self.read_timeout)
        self._stop_loop()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, limit=MAX_HEAD_BYTES
        )
        # Port 0 means "any free port": report the one the kernel picked.
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        # Aborted, not cancelled: each connection's task then ends on its own, as when a
        # peer hangs up (Python 3.11 logs a cancelled connection task as an error).
        for writer in self._connections.values():
            writer.transport.abort()
        await asyncio.gather(*self._connections, return_exceptions=True)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not threading.current_thread():
            self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self.max_connections and not self._evict_oldest_idle():
            # Every connection is being answered: refused at once, scraped next interval.
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None  # a connection callback always runs in a task
        self._connections[task] = self._idle[task] = writer
        try:
            await self._serve(reader, writer, task)
        finally:
            self._connections.pop(task, None)
            self._idle.pop(task, None)
            writer.transport.abort()  # a no-op once closed; drops a peer that went quiet

    def _evict_oldest_idle(self) -> bool:
        """Make room by closing the connection that has waited longest without a request.

        Held-open connections then cannot lock a scrape out: a scraper sends its request
        at once, long before the others push it out.
        """
        for task, writer in self._idle.items():
            del self._idle[task]
            del self._connections[task]
            writer.transport.abort()  # its read ends at once, and so does its task
            return True
        return False

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, task: asyncio.Task[None]
    ) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return  # idle, gone, or too slow to say what it wants: nothing to answer
        except asyncio.LimitOverrunError:
            head = b""
        self._idle.pop(task, None)
        status, content_type, body = self._route(head)
        with contextlib.suppress(TimeoutError, ConnectionError):
            writer.write(_response(status, content_type, body))
            await asyncio.wait_for(writer.drain(), self.read_timeout)
            writer.close()

    def _route(self, head: bytes) -> tuple[str, str, bytes]:
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3:
            return "400 Bad Request", "text/plain", b"bad request\n"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"only GET\n"
        if target != "/metrics":
            return "404 Not Found", "text/plain", b"only /metrics\n"
        # Text format 0.0.4, the label prometheus_client's own server gives it.
        return "200 OK", CONTENT_TYPE_PLAIN_0_0_4, generate_latest(self.registry)


def _response(status: str, content_type: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body
