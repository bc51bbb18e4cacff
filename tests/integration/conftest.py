"""Integration tests share the session's real servers (tests/conftest.py).

Tests keep apart by using their own collection and measurement names.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client

from deploy.local.nats import NatsServer


@pytest.fixture
def unique() -> str:
    """A name unique to this test, fit for a collection, a measurement or a tag value."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    """A NATS connection of the test's own to the session's server."""
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()
