"""Case 3: the NATS server restarts mid-load (same store); both sides reconnect, nothing lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from nats.js import JetStreamContext

from deploy.local.client import connect, ensure_stream
from deploy.local.nats import NatsServer
from tests.faults.conftest import node_config
from tests.faults.harness import Load, texts

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

COUNT = 2000


@pytest.fixture
def own_nats() -> object:
    """A server of this test's own: restarting the session's would disturb other tests."""
    with NatsServer() as server:
        yield server


@pytest.fixture
async def own_js(own_nats: NatsServer) -> AsyncIterator[JetStreamContext]:
    nc, js = await connect(own_nats.url)
    yield js
    await nc.close()


async def test_3_nats_server_restart_mid_load(
    own_nats: NatsServer, own_js: JetStreamContext, stream_name, make_node, fault_report
) -> None:
    # Acks and PubAcks lost with the connection: those messages come back after the ack
    # wait (30 s by default; short here to keep the suite short).
    config = node_config(
        own_nats.url, stream_name, KRT_ACK_WAIT="3", FAULTS_DELAY="0.05", KRT_MAX_IN_FLIGHT="32"
    )
    await ensure_stream(own_js, config.stream, config.subjects)
    node = make_node(config)
    await asyncio.to_thread(node.start)
    load = await Load(own_js, config, "3 restart NATS server", fault_report).start()

    await load.send(texts(COUNT))
    await load.until_answered(COUNT // 5)
    load.fault()
    await asyncio.to_thread(own_nats.restart, 1.0)  # down for a second, same port and store
    await load.start()  # a fresh reader: the old one's consumer may not have survived
    await asyncio.to_thread(node.wait_ready, 60)

    await load.finish()
    assert node.sidecar is not None and node.sidecar.poll() is None
    assert node.host is not None and node.host.poll() is None
