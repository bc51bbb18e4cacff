"""The handler host's /metrics server: idle connections cost no thread and time out.

prometheus_client's own server held a thread per connection, idle ones included, with
no timeout. These open many connections that never send a request, as a careless or
hostile client would, and check that threads stay put and a scrape still gets through.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import pytest
from prometheus_client import CollectorRegistry, Counter

from handler_host import metrics
from handler_host.metrics_http import THREAD_NAME, ScrapeServer

pytestmark = pytest.mark.timeout(60)

IDLE = 300


def wait_for(check: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """tests.waiting.eventually, for code that runs in no event loop."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not true after {timeout:g}s"
        time.sleep(0.01)


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@contextmanager
def idle_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    with ExitStack() as stack:
        yield [
            stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
            for _ in range(count)
        ]


def closed_by_server(conn: socket.socket) -> bool:
    try:
        return conn.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def server_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME and t.is_alive()]


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("kre_test_scraped", "A sample for the page.", registry=registry).inc()
    return registry


@pytest.fixture
def served(registry: CollectorRegistry) -> Iterator[Callable[..., ScrapeServer]]:
    started: list[ScrapeServer] = []

    def serve(**limits: float) -> ScrapeServer:
        server = ScrapeServer(registry, "127.0.0.1", 0, **limits)  # type: ignore[arg-type]
        server.start()
        started.append(server)
        return server

    yield serve
    for server in started:
        server.close()


async def test_idle_connections_hold_no_thread_and_a_scrape_still_works() -> None:
    before = threading.active_count()
    server = metrics.MetricsServer.start("127.0.0.1", 0)
    assert server is not None
    try:
        with idle_connections(server.port, IDLE):
            # Answered after every earlier connection was accepted (and given its thread,
            # if the server made one per connection).
            status, page = scrape(server.port)
            threads = threading.active_count()
    finally:
        await server.close()

    assert status == 200 and "kre_handler_host_in_flight" in page
    assert threads <= before + 1  # the server's own thread, not one per connection
    assert not server_threads()  # and that one ends with close()


def test_a_connection_that_sends_no_request_is_closed_after_the_read_timeout(
    served: Callable[..., ScrapeServer],
) -> None:
    server = served(read_timeout=0.2)
    with idle_connections(server.port, 3) as conns:
        for conn in conns:
            conn.settimeout(0.05)
            wait_for(lambda conn=conn: closed_by_server(conn), what="closed by the server")
        wait_for(lambda: server.open_connections == 0, what="forgotten by the server")


def test_past_the_bound_the_longest_idle_connection_makes_room(
    served: Callable[..., ScrapeServer],
) -> None:
    server = served(max_connections=4)
    with idle_connections(server.port, 10) as conns:
        status, page = scrape(server.port)
        assert server.open_connections <= 4
        conns[0].settimeout(5)
        assert closed_by_server(conns[0])  # the oldest went first

    assert status == 200 and "kre_test_scraped_total 1.0" in page


def test_only_get_metrics_is_served(served: Callable[..., ScrapeServer]) -> None:
    server = served()
    status, _ = scrape(server.port, "/")
    assert status == 404
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.recv(100).startswith(b"HTTP/1.1 405 ")


def test_close_ends_the_thread_and_every_connection(registry: CollectorRegistry) -> None:
    server = ScrapeServer(registry, "127.0.0.1", 0)
    server.start()
    with idle_connections(server.port, 5) as conns:
        wait_for(lambda: server.open_connections == 5, what="connections accepted")
        server.close()
        for conn in conns:
            assert closed_by_server(conn)
    assert not server_threads()


def test_a_port_in_use_is_an_os_error_and_leaves_no_thread(registry: CollectorRegistry) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = ScrapeServer(registry, "127.0.0.1", taken.getsockname()[1])
        with pytest.raises(OSError):
            server.start()
    assert not server_threads()
