"""Real MongoDB-protocol and InfluxDB-protocol servers, started once per session.

Both are stopped and their temporary folders removed when the session ends, failed
tests or not. Tests keep apart by using their own collection and measurement names.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from deploy.local.influx import InfluxServer
from deploy.local.mongo import MongoServer


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
def unique() -> str:
    """A name unique to this test, fit for a collection, a measurement or a tag value."""
    return f"t{uuid.uuid4().hex[:12]}"
