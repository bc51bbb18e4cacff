"""The sidecar's channel to the handler host: one gRPC connection, one long-lived stream.

`HandlerChannel` follows the host's health (`sidecar/health.py`) and keeps ONE
`ProcessBatch` stream open while the host is SERVING. `call()` tags a Delivery with an
id, queues it for the stream and waits for the events the stream routes back by
delivery id: early replies first (handed to a callback, in order), then the Result.
When the stream breaks or the host goes away, every call still waiting raises
HandlerUnavailable, and the stream is opened again once the host reports SERVING.

The stream's request side is `sidecar/framing.py`'s `batches()`: every Delivery queued
by the time grpc can write the next message goes in one DeliveryBatch, so a busy node
pays one gRPC message per batch and a quiet one sends batches of one.

The client is grpcio's asyncio API, the stack the host serves with.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf import any_pb2

from protos import runner_pb2
from protos.contract import BATCH_BYTES, DEFAULT_MAX_MESSAGE_BYTES, SERVICE_NAME
from sidecar.errors import HandlerUnavailable
from sidecar.framing import Request, batches, request
from sidecar.health import MAX_BACKOFF, MIN_BACKOFF, follow_health, rpc_reason, unexpected_reason

log = logging.getLogger(__name__)

EarlyReplyCallback = Callable[[any_pb2.Any], Awaitable[None]]
_Item = runner_pb2.Event | HandlerUnavailable
PROCESS_BATCH = f"/{SERVICE_NAME}/ProcessBatch"
ENDED = "the handler host ended the stream"


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # grpc's own reconnect backoff grows to minutes; the host is in the same pod.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        # The host is in the same pod: an http_proxy meant for the pod's outbound
        # traffic must not carry a TCP address of it.
        ("grpc.enable_http_proxy", 0),
    ]


class HostLost(HandlerUnavailable):
    """The delivery was in the handler host when it failed: died, broke the stream, or
    sent no Result in time. The delivery may be what failed it (`sidecar.isolation`)."""


class HandlerChannel:
    """The connection to the handler host. `start()` it, `call()` it, `close()` it."""

    def __init__(
        self,
        address: str,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        result_timeout: float | None = None,
    ) -> None:
        self.address = address
        self._max_message_bytes = max_message_bytes
        # The safety net behind the host's own KRT_HANDLER_TIMEOUT; None: wait forever.
        self._result_timeout = result_timeout
        self._channel: grpc.aio.Channel | None = None
        self._serving = asyncio.Event()
        self._ready = asyncio.Event()
        self._requests: asyncio.Queue[Request | None] | None = None
        self._pending: dict[int, _Call] = {}
        # Deliveries given up on (no Result in time) that the host may still be running.
        self._abandoned: set[int] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._heard = False  # any health answer or failure seen yet
        self.status = "not started"

    @property
    def serving(self) -> bool:
        """The host reports SERVING (it has finished init and is not shutting down)."""
        return self._serving.is_set()

    @property
    def ready(self) -> bool:
        """SERVING and the handler stream is open: calls can be made."""
        return self._ready.is_set()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def wait_ready(self) -> bool:
        """Wait until calls can be made; always True (a value, for `wait_for` style use)."""
        return await self._ready.wait()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no delivery of ours runs in the host; False after `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return self._idle.is_set()
        return True

    def _update_idle(self) -> None:
        if self._pending or self._abandoned:
            self._idle.clear()
        else:
            self._idle.set()

    async def start(self) -> None:
        channel = grpc.aio.insecure_channel(
            self.address, options=channel_options(self._max_message_bytes)
        )
        self._channel = channel
        self.status = "waiting for the handler host"
        log.info("handler channel to %s started", self.address)
        self._tasks = [
            asyncio.create_task(follow_health(channel, self._set_serving), name="handler-health"),
            asyncio.create_task(self._keep_stream(channel), name="handler-stream"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._fail_pending("the channel is closed")
        self._serving.clear()
        self._update_ready("channel closed")
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        log.info("handler channel to %s closed", self.address)

    async def call(
        self,
        delivery: runner_pb2.Delivery,
        on_early_reply: EarlyReplyCallback,
        message: bytes | None = None,
    ) -> runner_pb2.Result:
        """Run one delivery through the handler; raise HandlerUnavailable if the host is gone.

        Sets `delivery.id`. `message`: the serialized KreNatsMessage, sent as the
        Delivery's `message` as it is (then `delivery.message` must be unset), so an
        envelope that arrived as bytes is neither copied into the Delivery nor encoded
        again. Early replies are awaited through `on_early_reply`, in the order the
        handler sent them, before the Result is returned. With a result timeout, a host
        that sends no Result in time counts as unreachable.
        """
        requests = self._requests
        if requests is None:
            raise HandlerUnavailable(f"no open stream to the handler host ({self.status})")
        delivery.id = next(self._ids)
        events = _Call()
        self._pending[delivery.id] = events
        self._idle.clear()
        requests.put_nowait(request(delivery, message))
        try:
            if self._result_timeout is None:  # the default: no timer to set and cancel
                return await _result(events, on_early_reply)
            async with asyncio.timeout(self._result_timeout) as deadline:
                return await _result(events, on_early_reply)
        except TimeoutError:
            if self._result_timeout is None or not deadline.expired():
                raise
            log.warning(
                "no Result for delivery %d (stream seq %d) within %.0fs: the "
                "handler host does not answer; KRT_HANDLER_TIMEOUT cannot stop a handler "
                "that blocks the host's event loop or never returns (see its log)",
                delivery.id,
                delivery.stream_sequence,
                self._result_timeout,
            )
            if self._requests is requests:  # still on the stream: the host may run it yet
                self._abandoned.add(delivery.id)
            raise HostLost(
                f"no result from the handler host within {self._result_timeout:g}s"
            ) from None
        finally:
            self._pending.pop(delivery.id, None)
            self._update_idle()

    # Health

    def _set_serving(self, serving: bool, why: str) -> None:
        if not serving and not self._heard:
            log.info("handler host at %s not serving yet: %s", self.address, why)
        self._heard = True
        if serving != self._serving.is_set():
            if serving:
                self._serving.set()
                log.info("handler host at %s is SERVING", self.address)
            else:
                self._serving.clear()
                log.warning("handler host at %s is not serving: %s", self.address, why)
        self._update_ready(why)

    def _update_ready(self, why: str = "") -> None:
        if self._serving.is_set() and self._requests is not None:
            self._ready.set()
            self.status = "serving"
        else:
            self._ready.clear()
            serving = self._serving.is_set()
            self.status = "handler stream not open" if serving else (why or "not serving")

    # The ProcessBatch stream

    async def _keep_stream(self, channel: grpc.aio.Channel) -> None:
        """Open the stream whenever the host is SERVING and none is open, until cancelled."""
        delay = MIN_BACKOFF
        loop = asyncio.get_running_loop()
        while True:
            await self._serving.wait()
            opened = loop.time()
            try:
                why = await self._run_stream(channel)
            except Exception as exc:  # a bug (ours or grpc's): fail the calls, open another
                log.exception("the stream to the handler host failed")
                why = unexpected_reason(exc)
            self._fail_pending(why)
            log.warning("ProcessBatch stream to the handler host closed: %s", why)
            if loop.time() - opened > MAX_BACKOFF * 5:
                delay = MIN_BACKOFF
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)

    async def _run_stream(self, channel: grpc.aio.Channel) -> str:
        """Open the stream, route its events until it ends; return why it ended."""
        requests: asyncio.Queue[Request | None] = asyncio.Queue()
        cap = min(BATCH_BYTES, self._max_message_bytes)
        # No serializers: batches are bytes already, and EventBatch is parsed below, where
        # a message that does not parse fails the stream instead of reading as None.
        stream = channel.stream_stream(PROCESS_BATCH)(batches(requests, cap))
        try:
            # The host sends its headers as soon as it takes the stream; a stream it
            # refuses (shutting down, say) has ended by then, with its status.
            await stream.initial_metadata()
            if stream.done():
                return await _ending(stream)
            self._requests = requests
            self._update_ready()
            log.info("ProcessBatch stream to the handler host opened")
            route = self._route
            async for data in stream:
                for event in runner_pb2.EventBatch.FromString(data).events:
                    route(event)
            return ENDED
        except grpc.aio.AioRpcError as exc:
            return rpc_reason(exc)
        finally:
            self._requests = None
            self._update_ready("stream closed")
            requests.put_nowait(None)
            stream.cancel()

    def _route(self, event: runner_pb2.Event) -> None:
        events = self._pending.get(event.delivery_id)
        if events is None:
            if event.WhichOneof("kind") == "result" and event.delivery_id in self._abandoned:
                self._abandoned.discard(event.delivery_id)
                self._update_idle()
                log.info("late Result for delivery %d: the host is done with it", event.delivery_id)
                return
            # Its caller gave up (shutdown): the result has nowhere to go.
            log.debug("event for delivery %d that nobody waits for", event.delivery_id)
            return
        events.put(event)

    def _fail_pending(self, why: str) -> None:
        error = HostLost(why)
        for events in self._pending.values():
            events.put(error)
        # The stream is gone: the host cancels what ran on it, or has died.
        self._abandoned.clear()
        self._update_idle()


class _Call:
    """The events routed to one call, in order; lighter than an asyncio.Queue per call."""

    __slots__ = ("_items", "_wake")

    def __init__(self) -> None:
        self._items: collections.deque[_Item] = collections.deque()
        self._wake: asyncio.Future[None] | None = None

    def put(self, item: _Item) -> None:
        self._items.append(item)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def get(self) -> _Item:
        while not self._items:
            self._wake = asyncio.get_running_loop().create_future()
            await self._wake
        return self._items.popleft()


async def _result(events: _Call, on_early_reply: EarlyReplyCallback) -> runner_pb2.Result:
    while True:
        item = await events.get()
        if isinstance(item, HandlerUnavailable):  # one instance per caller
            lost = isinstance(item, HostLost)
            raise HostLost(item.reason) if lost else HandlerUnavailable(item.reason)
        if item.WhichOneof("kind") == "result":
            return item.result
        await on_early_reply(item.early_reply)


async def _ending(stream: grpc.aio.StreamStreamCall) -> str:
    """Why a stream that has ended did: the host's OK end, or its status."""
    code = await stream.code()
    if code == grpc.StatusCode.OK:
        return ENDED
    return f"{code.name}: {await stream.details()}"
