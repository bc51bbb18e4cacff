"""Fixtures shared by the suites that need real servers.

Each server starts once per session, on a free port of 127.0.0.1, and is stopped (its
temporary folder removed) when the session ends, failed tests or not.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from deploy.local.influx import InfluxServer
from deploy.local.mongo import MongoServer
from deploy.local.nats import NatsServer
from deploy.local.node import LocalNode, NodeConfig


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """One real nats-server with JetStream for the session; tests use their own streams."""
    with NatsServer() as server:
        yield server


@pytest.fixture(scope="session")
def mongo_server() -> Iterator[MongoServer]:
    """nx-27017 on a free port of 127.0.0.1 (see deploy/local/mongo.py)."""
    with MongoServer() as server:
        yield server


@pytest.fixture(scope="session")
def influx_server() -> Iterator[InfluxServer]:
    """VictoriaMetrics taking InfluxDB writes on a free port (see deploy/local/influx.py)."""
    with InfluxServer() as server:
        yield server


@pytest.fixture
def stream_name(request: pytest.FixtureRequest) -> str:
    """A stream name unique to this test."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40].strip("-")
    return f"{base}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[object]:
    from deploy.local.client import connect

    nc, jetstream = await connect(nats_server.url)
    yield jetstream
    await nc.close()


@pytest.fixture
def make_node(request: pytest.FixtureRequest) -> Iterator[Callable[[NodeConfig], LocalNode]]:
    """Build local nodes (not started); print their logs when the test failed; stop them."""
    nodes: list[LocalNode] = []

    def make(config: NodeConfig) -> LocalNode:
        node = LocalNode(config)
        nodes.append(node)
        return node

    yield make
    report = getattr(request.node, "rep_call", None)
    for node in nodes:
        if report is not None and report.failed:
            print(node.logs(80))
        node.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Keep each phase's report on the test item, for fixtures that look at the outcome."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
