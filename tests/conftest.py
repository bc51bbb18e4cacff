"""Fixtures shared by the suites that need real servers.

Each server starts once per session, on a free port of 127.0.0.1, and is stopped (its
temporary folder removed) when the session ends, failed tests or not.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from deploy.local.influx import InfluxServer
from deploy.local.mongo import MongoServer
from deploy.local.nats import NatsServer


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
