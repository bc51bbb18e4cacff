"""Both processes as real subprocesses around a real nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from deploy.local.client import ensure_stream
from deploy.local.nats import NatsServer
from deploy.local.node import LocalNode, NodeConfig

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


@pytest.fixture
def make_node(request: pytest.FixtureRequest) -> Iterator[Callable[[NodeConfig], LocalNode]]:
    """Start nodes; on failure print their logs; always stop them."""
    nodes: list[LocalNode] = []

    def make(config: NodeConfig) -> LocalNode:
        node = LocalNode(config)
        nodes.append(node)
        return node

    yield make
    failed = getattr(request.node, "rep_call", None)
    for node in nodes:
        if failed is not None and failed.failed:
            print(node.logs(80))
        node.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
