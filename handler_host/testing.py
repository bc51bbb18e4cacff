"""Test a handler in-process over the real gRPC contract, with no NATS.

For users' own handler tests (and the project's)::

    from handler_host.testing import serve_node

    async def test_greets():
        async with serve_node("examples/greeter/handler.py") as node:
            reply = await node.call(Request(name="Ada"), Response)
        assert reply.greeting == "Hello, Ada!"

The node goes through the same start sequence as ``kre-handler-host`` (load, gRPC
server, ``init(ctx)``, SERVING) on ``127.0.0.1`` with a free port, and every call goes
through the unary ``Handle`` RPC, as the sidecar's deliveries do through ``Process``.
``ctx.db``, ``ctx.prediction`` and ``ctx.measurement`` are in-memory fakes
(``InMemoryStores``) unless real ones (``handler_host.services.Services``) are given.

Loaded as a pytest plugin (the ``pytest11`` entry point), this module also gives the
fixture ``start_node`` (needs pytest-asyncio): ``node = await start_node(path)``,
stopped at the end of the test. See docs/testing.md.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from handler_host.context import Context, ContextServices, pack_any
from handler_host.fakes import InMemoryStores
from handler_host.main import start_host
from handler_host.server import HostServer
from handler_host.settings import HostSettings
from protos import kre_nats_msg_pb2, runner_pb2, runner_pb2_grpc

_M = TypeVar("_M", bound=Message)


class HandlerFailed(Exception):
    """The handler raised: its exception's class name, message and traceback."""

    def __init__(self, failure: runner_pb2.Failure) -> None:
        self.type = failure.type
        self.message = failure.message
        self.traceback = failure.traceback
        self.retryable = failure.retryable
        kind = "retryable failure" if self.retryable else "failure"
        super().__init__(
            f"the handler raised {self.type}: {self.message} ({kind})\n{self.traceback}"
        )


@dataclass
class HandlerClient:
    """A started host and a channel to it."""

    host: HostServer
    channel: grpc.aio.Channel
    stub: runner_pb2_grpc.HandlerHostStub = field(init=False)
    _next_id: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.stub = runner_pb2_grpc.HandlerHostStub(self.channel)

    def delivery(
        self,
        payload: Message,
        *,
        tracking_id: str = "test",
        replied: bool = False,
        attempt: int = 1,
        headers: Mapping[str, str] | None = None,
    ) -> runner_pb2.Delivery:
        """A Delivery as the sidecar would send it, with ``payload`` packed in Any."""
        self._next_id += 1
        message = kre_nats_msg_pb2.KreNatsMessage(
            tracking_id=tracking_id, payload=pack_any(payload), replied=replied
        )
        return runner_pb2.Delivery(
            id=self._next_id, message=message, attempt=attempt, headers=dict(headers or {})
        )

    async def handle(
        self, payload: Message, *, tracking_id: str = "test", replied: bool = False, **kw: Any
    ) -> runner_pb2.HandleReply:
        """Run the handler on ``payload`` through the unary Handle RPC; the raw reply."""
        delivery = self.delivery(payload, tracking_id=tracking_id, replied=replied, **kw)
        reply: runner_pb2.HandleReply = await self.stub.Handle(delivery)
        return reply


@dataclass
class HandlerNode(HandlerClient):
    """A handler served in-process: ``await node.call(msg)`` runs ``handler(ctx, msg)``."""

    stores: ContextServices | None = None
    early_replies: list[Any] = field(default_factory=list, init=False)
    exited_early: bool = field(default=False, init=False)  # the last call's ctx.early_exit()

    @property
    def ctx(self) -> Context:
        """The shared ctx (what ``init`` set is here; ``node.ctx.set`` works too)."""
        return self.host.dispatcher.context

    async def call(
        self,
        payload: Message,
        response_type: type[_M] | None = None,
        *,
        tracking_id: str = "test",
        replied: bool = False,
        attempt: int = 1,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """The handler's answer to ``payload``: its message, or None; raises HandlerFailed.

        With ``response_type`` the answer is unpacked into it (TypeError if the handler
        returned another type); without, into the class its type URL names, if that
        type is imported, else the ``Any`` is returned. ``node.early_replies`` holds
        this call's early replies, unpacked the same way (without ``response_type``), and
        ``node.exited_early`` whether it called ``ctx.early_exit()``.
        """
        reply = await self.handle(
            payload, tracking_id=tracking_id, replied=replied, attempt=attempt, headers=headers
        )
        self.early_replies = [unpack(p) for p in reply.early_replies]
        result = reply.result
        self.exited_early = result.early_exit
        outcome = result.WhichOneof("outcome")
        if outcome == "failure":
            raise HandlerFailed(result.failure)
        if outcome is None:
            return None
        return unpack(result.payload, response_type)


def unpack(payload: any_pb2.Any, message_type: type[_M] | None = None) -> Any:
    """``payload`` as a ``message_type`` (or the type its URL names, if known)."""
    if message_type is None:
        try:
            name = payload.type_url.rpartition("/")[2]
            descriptor = descriptor_pool.Default().FindMessageTypeByName(name)
        except KeyError:
            return payload
        message_type = message_factory.GetMessageClass(descriptor)
    message = message_type()
    if not payload.Unpack(message):
        raise TypeError(
            f"the handler returned a {payload.type_url.rpartition('/')[2]}, "
            f"not a {message_type.DESCRIPTOR.full_name}"
        )
    return message


@asynccontextmanager
async def serve_node(
    handler: str | Path,
    base_path: str | Path | None = None,
    *,
    stores: ContextServices | None = None,
    node_name: str = "handler",
    address: str = "127.0.0.1:0",
    **settings: Any,
) -> AsyncIterator[HandlerNode]:
    """Serve the handler file ``handler`` in this process; stop it on leaving the block.

    ``base_path`` (KRT_BASE_PATH, the root of ``ctx.path``) defaults to the handler's
    folder. ``stores`` defaults to a new ``InMemoryStores``. Other keywords are
    ``HostSettings`` fields (``handler_threads=2``, ``handler_timeout=5``...).
    ``sys.path`` is restored on leaving (the host puts the handler's folder first).
    """
    root, path = _locate(handler, base_path)
    if stores is None:
        stores = InMemoryStores(
            version_id=settings.get("version_id", ""), version_name=settings.get("version", "")
        )
    saved_path = list(sys.path)
    try:
        async with serve_handler(
            root, path, address=address, services=stores, node_name=node_name, **settings
        ) as client:
            yield HandlerNode(client.host, client.channel, stores=stores)
    finally:
        sys.path[:] = saved_path


def _locate(handler: str | Path, base_path: str | Path | None) -> tuple[str, str]:
    path = os.path.abspath(handler)
    return (os.path.abspath(base_path) if base_path is not None else os.path.dirname(path)), path


@asynccontextmanager
async def serve_handler(
    base_path: str,
    handler_path: str = "handler.py",
    *,
    address: str = "127.0.0.1:0",
    services: ContextServices | None = None,
    **settings: Any,
) -> AsyncIterator[HandlerClient]:
    """The lower-level form: raw ``HandleReply`` answers, no data services by default.

    Keywords after ``services`` are ``HostSettings`` fields (``node_name``...).
    """
    config = HostSettings(base_path, handler_path, handler_address=address, **settings)
    host = await start_host(config, services)
    try:
        async with grpc.aio.insecure_channel(host.target) as channel:
            yield HandlerClient(host, channel)
    finally:
        await host.stop(0)


# --- pytest plugin -----------------------------------------------------------------

try:
    import pytest_asyncio
except ImportError:  # not under pytest: serve_node is all there is
    pytest_asyncio = None  # type: ignore[assignment]

if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def start_node() -> AsyncIterator[Any]:
        """``node = await start_node(handler_file, ...)``: ``serve_node``'s arguments;
        every node started is stopped when the test ends."""
        async with AsyncExitStack() as stack:

            async def start(handler: str | Path, *args: Any, **kwargs: Any) -> HandlerNode:
                return await stack.enter_async_context(serve_node(handler, *args, **kwargs))

            yield start
