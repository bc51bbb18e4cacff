"""A MongoDB that is down: the host still starts, calls fail fast and clearly, and the
same client works again once the server is back."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from deploy.local.mongo import MongoServer
from handler_host.errors import RetryableError
from handler_host.services import Services, ServiceSettings, StoreUnavailableError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

TIMEOUT_S = 1.0
# The error must come within the timeout, plus scheduling slack; never a hang.
LIMIT_S = TIMEOUT_S + 1.5


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and then never says a word."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


def build(uri: str) -> Services:
    settings = ServiceSettings(mongo_uri=uri, mongo_timeout_s=TIMEOUT_S)
    started = time.monotonic()
    services = Services.from_settings(settings, "vid", "v", "wf", "node")
    assert time.monotonic() - started < 0.5  # building never waits for the server
    return services


async def assert_every_call_fails_fast(services: Services) -> None:
    assert services.db is not None and services.prediction is not None
    calls = {
        "ctx.db.save": lambda: services.db.save("c", {"a": 1}),  # type: ignore[union-attr]
        "ctx.db.find": lambda: services.db.find("c", {"a": 1}),  # type: ignore[union-attr]
        "ctx.prediction.save": lambda: services.prediction.save("p", "t"),  # type: ignore[union-attr]
    }
    for method, call in calls.items():
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as caught:
            await call()
        elapsed = time.monotonic() - started
        assert elapsed < LIMIT_S, f"{method} took {elapsed:.1f} s"
        error = caught.value
        assert str(error).startswith(f"[{method}] MongoDB at 127.0.0.1:")
        assert "did not answer within 1 s (KRT_MONGO_TIMEOUT)" in str(error)
        assert not isinstance(error, RetryableError)  # the message gets its error envelope


async def test_a_stopped_server_gives_a_clear_error_within_the_timeout() -> None:
    server = MongoServer().start()
    uri = server.uri
    server.close()
    services = build(uri)
    try:
        await assert_every_call_fails_fast(services)
    finally:
        await services.close()


async def test_a_server_that_never_answers_gives_a_clear_error_within_the_timeout(
    silent_port: int,
) -> None:
    services = build(f"mongodb://kre:hunter2@127.0.0.1:{silent_port}/")
    try:
        await assert_every_call_fails_fast(services)
        with pytest.raises(StoreUnavailableError) as caught:
            await services.db.find("c", {"a": 1})  # type: ignore[union-attr]
        assert "hunter2" not in str(caught.value)
    finally:
        await services.close()


async def test_the_same_client_works_again_when_the_server_comes_back() -> None:
    with MongoServer() as server:
        services = build(server.uri)
        try:
            assert services.db is not None
            await services.db.save("back", {"n": 1})
            server.stop()
            with pytest.raises(StoreUnavailableError):
                await services.db.save("back", {"n": 2})
            server.start()  # same port, same data
            await services.db.save("back", {"n": 3})
            found = await services.db.find("back", {"n": {"$in": [1, 2, 3]}})
            assert sorted(doc["n"] for doc in found) == [1, 3]
        finally:
            await services.close()
