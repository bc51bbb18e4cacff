"""A tiny in-process handler host for the sidecar's tests: the gRPC contract, no user code.

Each test passes `respond(delivery, emit)`: it is run once per Delivery and calls
`emit(early_reply=...)` / `emit(result=...)` to write Events back on the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

import grpc
from google.protobuf import any_pb2, wrappers_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos import runner_pb2, runner_pb2_grpc

SERVICE = "kre.runner.v1.HandlerHost"
Emit = Callable[..., Awaitable[None]]
Respond = Callable[[runner_pb2.Delivery, Emit], Awaitable[None]]


def packed(text: str) -> any_pb2.Any:
    payload = any_pb2.Any()
    payload.Pack(wrappers_pb2.StringValue(value=text))
    return payload


def text_of(payload: any_pb2.Any) -> str:
    value = wrappers_pb2.StringValue()
    payload.Unpack(value)
    return value.value


async def greet(delivery: runner_pb2.Delivery, emit: Emit) -> None:
    """The default behaviour: answer `hello <input text>`."""
    text = text_of(delivery.message.payload)
    await emit(result=runner_pb2.Result(payload=packed(f"hello {text}")))


class _End(NamedTuple):
    code: grpc.StatusCode | None
    details: str


class FakeHandlerHost(runner_pb2_grpc.HandlerHostServicer):
    def __init__(self, respond: Respond = greet) -> None:
        self.respond = respond
        self.deliveries: list[runner_pb2.Delivery] = []
        self.streams = 0
        self._outs: set[asyncio.Queue[Any]] = set()
        # Set to hold ProcessBatch's headers back until the event is set (or forever).
        self.headers_held: asyncio.Event | None = None
        # Set to refuse ProcessBatch streams with this status, as a host shutting down does.
        self.refusal: _End | None = None
        self.batch_streams_asked = 0

    def refuse_streams(self, code: grpc.StatusCode | None, details: str = "") -> None:
        """Refuse new ProcessBatch streams with this status; None: take them again."""
        self.refusal = None if code is None else _End(code, details)

    def end_streams(self, code: grpc.StatusCode | None = None, details: str = "") -> None:
        """End every open stream: OK (code None), or with this status."""
        for out in self._outs:
            out.put_nowait(_End(code, details))

    async def Process(
        self, request_iterator: AsyncIterator[runner_pb2.Delivery], context: Any
    ) -> AsyncIterator[runner_pb2.Event]:
        self.streams += 1
        out: asyncio.Queue[runner_pb2.Event | _End] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def run_one(delivery: runner_pb2.Delivery) -> None:
            async def emit(**kind: Any) -> None:
                out.put_nowait(runner_pb2.Event(delivery_id=delivery.id, **kind))

            await self.respond(delivery, emit)

        async def read() -> None:
            async for delivery in request_iterator:
                self.deliveries.append(delivery)
                task = asyncio.create_task(run_one(delivery))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        reader = asyncio.create_task(read())
        self._outs.add(out)
        try:
            while not isinstance(item := await out.get(), _End):
                yield item
            if item.code is not None:
                await context.abort(item.code, item.details)
        finally:
            self._outs.discard(out)
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(reader, *tasks, return_exceptions=True)

    async def ProcessBatch(
        self, request_iterator: AsyncIterator[runner_pb2.DeliveryBatch], context: Any
    ) -> AsyncIterator[runner_pb2.EventBatch]:
        self.batch_streams_asked += 1
        if self.refusal is not None:
            await context.abort(self.refusal.code, self.refusal.details)
        if self.headers_held is not None:
            await self.headers_held.wait()
        await context.send_initial_metadata(())

        async def deliveries() -> AsyncIterator[runner_pb2.Delivery]:
            async for batch in request_iterator:
                for delivery in batch.deliveries:
                    yield delivery

        async for event in self.Process(deliveries(), context):
            yield runner_pb2.EventBatch(events=[event])


class RunningHost:
    """A started fake host: its server, its health servicer and the servicer itself."""

    def __init__(self, address: str, host: FakeHandlerHost) -> None:
        self.address = address
        self.host = host
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server()
        runner_pb2_grpc.add_HandlerHostServicer_to_server(host, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(address)

    @property
    def target(self) -> str:
        """The address a client dials (the real port when started on port 0)."""
        if self.address.startswith(("unix:", "unix-abstract:")):
            return self.address
        return f"{self.address.rsplit(':', 1)[0]}:{self.port}"

    async def start(self, serving: bool = True) -> RunningHost:
        await self.set_serving(serving)
        await self.server.start()
        return self

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set(SERVICE, status)
        await self.health.set("", status)

    async def stop(self, grace: float | None = None) -> None:
        await self.server.stop(grace)
