"""One ``Process`` call: many deliveries in flight on one bidirectional stream.

A reader task takes Deliveries off the request stream and starts one task per
delivery. Each task puts its early-reply Events and then its one Result Event on a
queue; the call's own task writes the queue to the response stream, so events of one
delivery keep their order while deliveries interleave.

The stream ends (status OK) when the client has closed its side, or shutdown has
begun, and every delivery started has had its Result written. Deliveries that arrive
after shutdown has begun are not run: they get no Result, and the sidecar treats them
as unanswered (nak, redelivered later).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2

from handler_host.dispatch import Dispatcher, failure_of
from protos import runner_pb2

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Wake:
    """Queue marker: re-check whether the stream is finished."""


@dataclass(frozen=True)
class _Abort:
    """Queue marker: the client broke the contract; end the call with this status."""

    code: grpc.StatusCode
    details: str


_WAKE = _Wake()


class ProcessStream:
    """The state of one Process call; ``run`` returns when the call is done."""

    def __init__(self, dispatcher: Dispatcher, context: grpc.aio.ServicerContext) -> None:
        self._dispatcher = dispatcher
        self._context = context
        self._queue: asyncio.Queue[runner_pb2.Event | _Wake | _Abort | BaseException] = (
            asyncio.Queue()
        )
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        self._client_done = False
        self._draining = False
        self._deliveries = 0

    async def run(self, requests: AsyncIterator[runner_pb2.Delivery]) -> None:
        logger.info("Process stream opened by %s", self._context.peer())
        reader = asyncio.create_task(self._read(requests))
        try:
            while not self._finished():
                item = await self._queue.get()
                if isinstance(item, runner_pb2.Event):
                    await self._context.write(item)
                elif isinstance(item, _Abort):
                    await self._context.abort(item.code, item.details)
                elif isinstance(item, BaseException):
                    raise item
        finally:
            await self._cancel(reader)
        logger.info("Process stream closed after %d deliveries", self._deliveries)

    def drain(self) -> None:
        """Take no new deliveries; end the stream once those in flight are answered."""
        self._draining = True
        self._queue.put_nowait(_WAKE)

    def _finished(self) -> bool:
        return (self._client_done or self._draining) and not self._in_flight and self._queue.empty()

    async def _read(self, requests: AsyncIterator[runner_pb2.Delivery]) -> None:
        try:
            async for delivery in requests:
                self._start(delivery)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to the writer, which ends the call
            self._queue.put_nowait(exc)
            return
        self._client_done = True
        self._queue.put_nowait(_WAKE)

    def _start(self, delivery: runner_pb2.Delivery) -> None:
        if self._draining:
            logger.warning(
                "delivery %d arrived after shutdown began: not run, the sidecar redelivers it",
                delivery.id,
            )
            return
        if delivery.id in self._in_flight:
            self._queue.put_nowait(
                _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"delivery id {delivery.id} is already in flight on this stream: "
                    "ids must be unique among in-flight deliveries",
                )
            )
            return
        self._deliveries += 1
        self._in_flight[delivery.id] = asyncio.create_task(
            self._deliver(delivery), name=f"delivery-{delivery.id}"
        )

    async def _deliver(self, delivery: runner_pb2.Delivery) -> None:
        delivery_id = delivery.id

        async def emit_early(payload: any_pb2.Any) -> None:
            self._queue.put_nowait(runner_pb2.Event(delivery_id=delivery_id, early_reply=payload))

        try:
            try:
                result = await self._dispatcher.dispatch(delivery, emit_early)
            except Exception as exc:  # a bug of ours: still exactly one Result
                logger.exception("dispatch failed on delivery %d", delivery_id)
                result = runner_pb2.Result(failure=failure_of(exc))
            self._queue.put_nowait(runner_pb2.Event(delivery_id=delivery_id, result=result))
        finally:
            # In the same step as the put: the writer never sees an empty in-flight
            # set before the Result is queued.
            self._in_flight.pop(delivery_id, None)

    async def _cancel(self, reader: asyncio.Task[None]) -> None:
        tasks = [reader, *self._in_flight.values()]
        if len(tasks) > 1:
            logger.warning(
                "Process stream ended with %d deliveries unanswered: they are cancelled",
                len(tasks) - 1,
            )
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
