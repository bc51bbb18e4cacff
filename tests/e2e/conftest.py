"""Both processes as real subprocesses around a real nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from deploy.local.client import ensure_stream
from deploy.local.nats import NatsServer
from deploy.local.node import NodeConfig

HANDLERS = Path(__file__).parent / "handlers"
pytestmark = pytest.mark.e2e


@pytest.fixture
def node_config(nats_server: NatsServer, stream_name: str) -> NodeConfig:
    return NodeConfig(
        nats_url=nats_server.url,
        stream=stream_name,
        base_path=HANDLERS,
        handler_path="words.py",
        node_name="words",
    )


@pytest.fixture
async def stream(js: object, node_config: NodeConfig) -> AsyncIterator[str]:
    await ensure_stream(js, node_config.stream, node_config.subjects)  # type: ignore[arg-type]
    yield node_config.stream
    await js.delete_stream(node_config.stream)  # type: ignore[attr-defined]
