"""The greeter tested the way a team tests its own handler: over gRPC, no NATS.

`start_node` is the pytest fixture of handler_host.testing (a pytest plugin, loaded
when the package is installed); `serve_node` is the same without pytest.
"""

from pathlib import Path

import pytest
from public_input_pb2 import Request, Response  # the handler's folder is this test's folder

from handler_host.testing import HandlerFailed, serve_node

HANDLER = Path(__file__).with_name("handler.py")


@pytest.fixture
async def node(start_node):
    return await start_node(HANDLER, node_name="greeter")


async def test_greets_by_name(node) -> None:
    reply = await node.call(Request(name="Ada"), Response)

    assert reply == Response(greeting="Hello, Ada!")
    assert node.early_replies == []


async def test_init_loaded_the_greetings(node) -> None:
    # What init(ctx) set with ctx.set is on the node's shared ctx.
    assert node.ctx.get("greetings")["es"] == "Hola"


async def test_an_empty_name_fails_with_the_handlers_error(node) -> None:
    with pytest.raises(HandlerFailed) as failed:
        await node.call(Request(name=""))

    assert failed.value.type == "ValueError"
    assert "Request.name is empty" in failed.value.message
    assert not failed.value.retryable
    assert "raise ValueError" in failed.value.traceback


async def test_without_the_fixture() -> None:
    async with serve_node(HANDLER) as node:
        reply = await node.call(Request(name="Grace"))  # unpacked by its type URL

    assert isinstance(reply, Response)
    assert reply.greeting == "Hello, Grace!"
