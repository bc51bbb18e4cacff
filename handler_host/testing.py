"""Run a handler in-process over the real gRPC contract, with no NATS.

For the project's tests and for users' own handler tests::

    async with serve_handler("examples/greeter", "handler.py") as host:
        reply = await host.handle(Request(name="Ada"))
        response = Response()
        reply.result.payload.Unpack(response)

The host goes through the same start sequence as ``kre-handler-host`` (load, gRPC
server, ``init(ctx)``, SERVING) on ``127.0.0.1`` with a free port, unless told
otherwise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import Message

from handler_host.context import ContextServices, pack_any
from handler_host.main import start_host
from handler_host.server import HostServer
from handler_host.settings import HostSettings
from protos import kre_nats_msg_pb2, runner_pb2, runner_pb2_grpc


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
        self, payload: Message, *, tracking_id: str = "test", replied: bool = False
    ) -> runner_pb2.Delivery:
        """A Delivery as the sidecar would send it, with ``payload`` packed in Any."""
        self._next_id += 1
        message = kre_nats_msg_pb2.KreNatsMessage(
            tracking_id=tracking_id, payload=pack_any(payload), replied=replied
        )
        return runner_pb2.Delivery(id=self._next_id, message=message, attempt=1)

    async def handle(
        self, payload: Message, *, tracking_id: str = "test", replied: bool = False
    ) -> runner_pb2.HandleReply:
        """Run the handler on ``payload`` through the unary Handle RPC."""
        delivery = self.delivery(payload, tracking_id=tracking_id, replied=replied)
        reply: runner_pb2.HandleReply = await self.stub.Handle(delivery)
        return reply


@asynccontextmanager
async def serve_handler(
    base_path: str,
    handler_path: str = "handler.py",
    *,
    address: str = "127.0.0.1:0",
    node_name: str = "handler",
    handler_threads: int = 1,
    services: ContextServices | None = None,
) -> AsyncIterator[HandlerClient]:
    """Start a handler host in this process; stop it (grace 0) on leaving the block."""
    settings = HostSettings(
        base_path=base_path,
        handler_path=handler_path,
        node_name=node_name,
        handler_address=address,
        handler_threads=handler_threads,
    )
    host = await start_host(settings, services)
    try:
        async with grpc.aio.insecure_channel(host.target) as channel:
            yield HandlerClient(host, channel)
    finally:
        await host.stop(0)
