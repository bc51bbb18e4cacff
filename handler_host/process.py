"""One ``Process`` or ``ProcessBatch`` call: many deliveries in flight on one stream.

A reader task takes Deliveries off the request stream (one per message, or every
Delivery of a DeliveryBatch) and starts one task per delivery. Each task queues its
early-reply Events and then its one Result Event; the call's own task writes the
queue to the response stream, so events of one delivery keep their order while
deliveries interleave. On a ``ProcessBatch`` call, every event queued by the time the
writer gets to run goes out in one EventBatch (at most ``BATCH_BYTES``, unless one
event alone is bigger): under load, one stream message carries many results; a quiet
stream sends batches of one.

The stream ends (status OK) when the client has closed its side, or shutdown has
begun, and every delivery started has had its Result written. Deliveries that arrive
after shutdown has begun are not run: they get no Result, and the sidecar treats them
as unanswered (nak, redelivered later).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2

from handler_host.dispatch import EVENT_ROOM, Dispatcher
from handler_host.errors import failure_of
from protos import runner_pb2
from protos.contract import BATCH_BYTES

logger = logging.getLogger(__name__)

# An EventBatch stops taking events at this size (the sidecar's DeliveryBatch limit too),
# or below KRT_GRPC_MAX_MESSAGE_BYTES when that is smaller.


@dataclass(frozen=True, slots=True)
class _Reply:
    """One Event to write: an early reply or the Result of a delivery."""

    delivery_id: int
    early_reply: any_pb2.Any | None = None
    result: runner_pb2.Result | None = None

    def event(self) -> runner_pb2.Event:
        if self.result is not None:
            return runner_pb2.Event(delivery_id=self.delivery_id, result=self.result)
        return runner_pb2.Event(delivery_id=self.delivery_id, early_reply=self.early_reply)

    def size(self) -> int:
        body = self.result if self.result is not None else self.early_reply
        return EVENT_ROOM + (body.ByteSize() if body is not None else 0)

    def add_to(self, batch: runner_pb2.EventBatch) -> None:
        # Built in place, the payload copied once (appending a finished Event would copy
        # the Event, payload included, a second time).
        event = batch.events.add(delivery_id=self.delivery_id)
        if self.result is not None:
            event.result.CopyFrom(self.result)
        elif self.early_reply is not None:
            event.early_reply.CopyFrom(self.early_reply)


@dataclass(frozen=True)
class _Abort:
    """Queue marker: the client broke the contract; end the call with this status."""

    code: grpc.StatusCode
    details: str


_Item = _Reply | _Abort | BaseException
_Request = runner_pb2.Delivery | runner_pb2.DeliveryBatch


class ProcessStream:
    """The state of one Process (or ProcessBatch) call; ``run`` returns when it is done."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        context: grpc.aio.ServicerContext,
        *,
        batched: bool = False,
        max_batch_bytes: int = BATCH_BYTES,
    ) -> None:
        self._dispatcher = dispatcher
        self._context = context
        self._batched = batched
        self._max_batch_bytes = max_batch_bytes
        self._queue: collections.deque[_Item] = collections.deque()
        self._wakeup = asyncio.Event()
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        self._client_done = False
        self._draining = False
        self._deliveries = 0

    @property
    def _kind(self) -> str:
        return "ProcessBatch" if self._batched else "Process"

    async def run(self, requests: AsyncIterator[_Request]) -> None:
        kind = self._kind
        logger.info("%s stream opened by %s", kind, self._context.peer())
        reader = asyncio.create_task(self._read(requests))
        try:
            while not self._finished():
                if not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                elif isinstance(self._queue[0], _Reply):
                    await self._write_replies()
                else:
                    item = self._queue.popleft()
                    if isinstance(item, _Abort):
                        await self._context.abort(item.code, item.details)
                    elif isinstance(item, BaseException):
                        raise item
        finally:
            await self._cancel(reader)
        logger.info("%s stream closed after %d deliveries", kind, self._deliveries)

    def drain(self) -> None:
        """Take no new deliveries; end the stream once those in flight are answered."""
        self._draining = True
        self._wakeup.set()

    def _put(self, item: _Item) -> None:
        self._queue.append(item)
        self._wakeup.set()

    def _finished(self) -> bool:
        return (self._client_done or self._draining) and not self._in_flight and not self._queue

    async def _write_replies(self) -> None:
        """Write the Event at the head of the queue; batched, every one queued behind it too."""
        if not self._batched:
            reply = self._queue.popleft()
            assert isinstance(reply, _Reply)
            await self._context.write(reply.event())
            return
        batch = runner_pb2.EventBatch()
        size = 0
        while self._queue and isinstance(reply := self._queue[0], _Reply):
            reply_size = reply.size()
            if size and size + reply_size > self._max_batch_bytes:
                break
            size += reply_size
            reply.add_to(batch)
            self._queue.popleft()
        await self._context.write(batch)

    async def _read(self, requests: AsyncIterator[_Request]) -> None:
        try:
            async for request in requests:
                for delivery in _deliveries(request):
                    self._start(delivery)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to the writer, which ends the call
            self._put(exc)
            return
        self._client_done = True
        self._wakeup.set()

    def _start(self, delivery: runner_pb2.Delivery) -> None:
        if self._draining:
            logger.warning(
                "delivery %d arrived after shutdown began: not run, the sidecar redelivers it",
                delivery.id,
            )
            return
        if delivery.id in self._in_flight:
            self._put(
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
            self._put(_Reply(delivery_id, early_reply=payload))

        try:
            try:
                result = await self._dispatcher.dispatch(delivery, emit_early)
            except Exception as exc:  # a bug of ours: still exactly one Result
                logger.exception("dispatch failed on delivery %d", delivery_id)
                result = runner_pb2.Result(failure=failure_of(exc))
            self._put(_Reply(delivery_id, result=result))
        finally:
            # In the same step as the put: the writer never sees an empty in-flight
            # set before the Result is queued.
            self._in_flight.pop(delivery_id, None)

    async def _cancel(self, reader: asyncio.Task[None]) -> None:
        tasks = [reader, *self._in_flight.values()]
        if len(tasks) > 1:
            logger.warning(
                "%s stream ended with %d deliveries unanswered: they are cancelled",
                self._kind,
                len(tasks) - 1,
            )
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _deliveries(request: _Request) -> Iterable[runner_pb2.Delivery]:
    if isinstance(request, runner_pb2.DeliveryBatch):
        return request.deliveries
    return (request,)
