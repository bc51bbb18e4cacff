"""The sidecar's channel to the handler host: one gRPC connection, one long-lived stream.

`HandlerChannel` follows the host's health (grpc.health.v1, service
`kre.runner.v1.HandlerHost`) and keeps ONE `ProcessBatch` stream open while the host
is SERVING. `call()` tags a Delivery with an id, queues it for the stream and waits
for the events the reader task routes back by delivery id: early replies first
(handed to a callback, in order), then the Result. When the stream breaks or the host
goes away, every call still waiting raises HandlerUnavailable, and the stream is
reopened once the host reports SERVING again.

Batching: the stream's writer sends every Delivery queued by the time it runs as one
DeliveryBatch (up to `BATCH_BYTES`), so a busy node pays one gRPC stream message per
batch instead of one per message, and a quiet one sends batches of one. Deliveries
are serialized once, in `call()`, and a batch is their bytes framed as the repeated
field they are: nothing is parsed or copied again on the way. A host without
ProcessBatch (an older image) answers UNIMPLEMENTED; the channel then uses `Process`,
one Delivery per stream message, for as long as it lives.

The client is grpclib (gRPC in Python over `h2`), not grpcio: the sidecar needs only a
client, and grpcio's C core is about 14 MB of a running sidecar's memory, grpclib 2
(docs/performance.md, finding 12). The host serves with grpcio; they speak plain gRPC.
The health messages are built in a descriptor pool of this module's own, so a process
that also loads grpcio's `grpc_health` (a test, say) has no clash of proto names.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import itertools
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import NamedTuple

import h2.exceptions
import hyperframe.frame
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory
from grpclib.client import Channel, Stream
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.protocol import H2Protocol

from protos import runner_pb2
from protos.contract import BATCH_BYTES, SERVICE_NAME
from sidecar.errors import HandlerUnavailable
from sidecar.settings import handler_endpoint

log = logging.getLogger(__name__)

MIN_BACKOFF = 0.05
MAX_BACKOFF = 2.0
POLL_INTERVAL = 1.0

EarlyReplyCallback = Callable[[any_pb2.Any], Awaitable[None]]
_Item = runner_pb2.Event | HandlerUnavailable
PROCESS_BATCH = "/kre.runner.v1.HandlerHost/ProcessBatch"
PROCESS = "/kre.runner.v1.HandlerHost/Process"
ENDED = "the handler host ended the stream"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
# grpc.health.v1.HealthCheckResponse.ServingStatus
_STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
_SERVING = 1
# What a broken connection or stream raises in grpclib (GRPCError aside).
_BROKEN = (OSError, StreamTerminatedError, ProtocolError, h2.exceptions.H2Error)
# A DeliveryBatch stops taking deliveries at this size (one bigger Delivery goes alone).
# Small enough that batching adds no big buffers: 4 MiB gave case (c) of the benchmark
# (100 KB messages) 30% more RSS in both processes and a lower rate than 1 MiB.
# Tag bytes of length-delimited fields: DeliveryBatch.deliveries (1), Delivery.message (2).
_DELIVERIES_TAG = b"\x0a"
_MESSAGE_TAG = b"\x12"


class _Request(NamedTuple):
    """One serialized Delivery, in parts that are joined once, where the stream writes it."""

    size: int
    parts: tuple[bytes, ...]


def _health_types() -> tuple[type, type]:
    """grpc.health.v1's HealthCheckRequest and HealthCheckResponse, in a pool of our own."""
    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="sidecar/grpc_health_v1.proto", package="grpc.health.v1", syntax="proto3"
    )
    request = proto.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=field.TYPE_STRING)
    response = proto.message_type.add(name="HealthCheckResponse")
    response.field.add(name="status", number=1, type=field.TYPE_INT32)  # an enum's varint
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{proto.package}.{name}"))
        for name in ("HealthCheckRequest", "HealthCheckResponse")
    )  # type: ignore[return-value]


HealthCheckRequest, HealthCheckResponse = _health_types()


def _data_frame_body_repr(frame: hyperframe.frame.DataFrame) -> str:
    """What hyperframe shows of a DATA frame's body, without hex-encoding all of it.

    h2 formats every frame it receives for a trace log line, logging on or off, and
    hyperframe's repr hex-encodes a whole body to keep its first 20 digits: 11% of the
    sidecar's CPU with 100 KB messages. The same text (padding aside), from 11 bytes.
    """
    head = binascii.hexlify(bytes(frame.data[:11])).decode("ascii")
    return f"<hex:{head[:20]}...>" if len(head) > 20 else f"<hex:{head}>" if head else "None"


hyperframe.frame.DataFrame._body_repr = _data_frame_body_repr  # type: ignore[method-assign]


class _Channel(Channel):
    """grpclib's Channel, able to reach a socket in the abstract namespace under uvloop.

    An abstract name starts with a NUL byte, and uvloop hands a socket path to libuv as
    a C string, which ends there: the socket is connected here and given to the loop.
    """

    async def _create_connection(self) -> H2Protocol:
        path = self._path
        if path is None or not path.startswith("\0"):
            return await super()._create_connection()
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, path)
        except BaseException:
            sock.close()
            raise
        _, protocol = await loop.create_unix_connection(self._protocol_factory, sock=sock)
        return protocol


class _Codec(CodecBase):
    """Requests go out as the bytes they are given (serialized once, by the caller)."""

    __content_subtype__ = "proto"

    def encode(self, message: bytes, message_type: object) -> bytes:
        return message

    def decode(self, data: bytes, message_type: type) -> object:
        return message_type.FromString(data)  # type: ignore[attr-defined]


class HandlerChannel:
    """The connection to the handler host. `start()` it, `call()` it, `close()` it."""

    def __init__(
        self,
        address: str,
        max_message_bytes: int = 64 * 1024 * 1024,
        result_timeout: float | None = None,
    ) -> None:
        self.address = address
        self._max_message_bytes = max_message_bytes
        # The safety net behind the host's own KRT_HANDLER_TIMEOUT; None: wait forever.
        self._result_timeout = result_timeout
        self._channel: _Channel | None = None
        self._serving = asyncio.Event()
        self._ready = asyncio.Event()
        self._requests: asyncio.Queue[_Request | None] | None = None
        self._batched = True  # until the host says it has no ProcessBatch
        self._pending: dict[int, _Call] = {}
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._poll_health = False
        self._heard = False  # any health answer or failure seen yet
        # Set by close(): grpclib can turn the cancel of a task into StreamTerminatedError
        # when the connection drops in the same loop iteration; the loops must still end.
        self._closing = False
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

    async def start(self) -> None:
        self._closing = False
        host, port, path = handler_endpoint(self.address)
        self._channel = _Channel(host, port, path=path, codec=_Codec(), config=Configuration())
        self.status = "waiting for the handler host"
        log.info("handler channel to %s started", self.address)
        self._tasks = [
            asyncio.create_task(self._follow_health(), name="handler-health"),
            asyncio.create_task(self._keep_stream(), name="handler-stream"),
        ]

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._fail_pending("the channel is closed")
        self._serving.clear()
        self._update_ready("channel closed")
        if self._channel is not None:
            self._channel.close()
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
        head = delivery.SerializeToString()
        if message is None:
            requests.put_nowait(_Request(len(head), (head,)))
        else:
            parts = (head, _MESSAGE_TAG, _varint(len(message)), message)
            requests.put_nowait(_Request(sum(map(len, parts)), parts))
        try:
            if self._result_timeout is None:  # the default: no timer to set and cancel
                return await _result(events, on_early_reply)
            async with asyncio.timeout(self._result_timeout) as deadline:
                return await _result(events, on_early_reply)
        except TimeoutError:
            if self._result_timeout is None or not deadline.expired():
                raise
            log.warning(
                "no Result for delivery %d (stream seq %d) within %.0fs: the handler host "
                "does not answer (see KRT_HANDLER_TIMEOUT)",
                delivery.id,
                delivery.stream_sequence,
                self._result_timeout,
            )
            raise HandlerUnavailable(
                f"no result from the handler host within {self._result_timeout:g}s"
            ) from None
        finally:
            self._pending.pop(delivery.id, None)

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

    async def _follow_health(self) -> None:
        delay = MIN_BACKOFF
        while not self._closing:
            try:
                why, heard = await self._watch_health()
            except Exception as exc:  # a bug, or grpclib's: log it and go on watching
                log.exception("the health watch of the handler host failed")
                why, heard = _unexpected_reason(exc), False
            if self._closing:
                return
            self._set_serving(False, why)
            delay = MIN_BACKOFF if heard else min(delay * 2, MAX_BACKOFF)
            await asyncio.sleep(delay)

    async def _watch_health(self) -> tuple[str, bool]:
        """Follow the host's status until the watch ends; say why and whether it answered."""
        assert self._channel is not None
        request = HealthCheckRequest(service=SERVICE_NAME).SerializeToString()
        heard = False
        try:
            if self._poll_health:
                while True:
                    reply = await self._check_health(request)
                    heard = True
                    self._set_serving(reply.status == _SERVING, _status_name(reply.status))
                    await asyncio.sleep(POLL_INTERVAL)
            watch = self._channel.request(
                HEALTH_WATCH, Cardinality.UNARY_STREAM, bytes, HealthCheckResponse
            )
            async with watch as stream:
                await stream.send_message(request, end=True)
                async for reply in stream:
                    heard = True
                    self._set_serving(reply.status == _SERVING, _status_name(reply.status))
            return "the health watch ended", heard
        except GRPCError as exc:
            if exc.status is Status.UNIMPLEMENTED and not self._poll_health:
                log.info("handler host has no health Watch; polling Check every %ss", POLL_INTERVAL)
                self._poll_health = True
                return "switching to health Check polling", True
            return _rpc_reason(exc), heard
        except TimeoutError:
            if self._poll_health:
                return f"no health answer within {POLL_INTERVAL * 5:g}s", heard
            return "UNAVAILABLE: connecting timed out", heard
        except _BROKEN as exc:
            return _broken_reason(exc), heard

    async def _check_health(self, request: bytes) -> object:
        assert self._channel is not None
        check = self._channel.request(
            HEALTH_CHECK,
            Cardinality.UNARY_UNARY,
            bytes,
            HealthCheckResponse,
            timeout=POLL_INTERVAL * 5,
        )
        async with check as stream:
            await stream.send_message(request, end=True)
            reply = await stream.recv_message()
        return HealthCheckResponse() if reply is None else reply  # none: UNKNOWN

    # The ProcessBatch (or Process) stream

    async def _keep_stream(self) -> None:
        delay = MIN_BACKOFF
        loop = asyncio.get_running_loop()
        while not self._closing:
            await self._serving.wait()
            opened = loop.time()
            try:
                why = await self._run_stream()
            except Exception as exc:  # a bug, or grpclib's: fail the calls, open another
                log.exception("the stream to the handler host failed")
                why = _unexpected_reason(exc)
            if self._closing:
                return
            if why is None:
                continue
            self._fail_pending(why)
            method = _method_name(self._batched)
            log.warning("%s stream to the handler host closed: %s", method, why)
            if loop.time() - opened > MAX_BACKOFF * 5:
                delay = MIN_BACKOFF
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)

    async def _run_stream(self) -> str | None:
        """Open the stream, route its events until it ends; return why it ended.

        None: the host has no ProcessBatch; the next stream is a Process one.
        """
        assert self._channel is not None
        requests: asyncio.Queue[_Request | None] = asyncio.Queue()
        batched = self._batched
        if batched:
            method, reply_type = PROCESS_BATCH, runner_pb2.EventBatch
            source = _batches(requests, min(BATCH_BYTES, self._max_message_bytes))
        else:
            method, reply_type = PROCESS, runner_pb2.Event
            source = _one_by_one(requests)
        try:
            call = self._channel.request(method, Cardinality.STREAM_STREAM, bytes, reply_type)
            async with call as stream:
                await stream.send_request()
                if batched:
                    # The host sends its headers at once when it takes the stream; refused
                    # (an older host's UNIMPLEMENTED, or shutting down), with the status.
                    await stream.recv_initial_metadata()
                self._requests = requests
                self._update_ready()
                log.info("%s stream to the handler host opened", _method_name(batched))
                return await _first_ending(self._read(stream, batched), _write(stream, source))
        except GRPCError as exc:
            if batched and exc.status is Status.UNIMPLEMENTED:
                return self._use_process()
            return _rpc_reason(exc)
        except StreamTerminatedError as exc:
            if _ended_ok(call):
                return ENDED
            return _broken_reason(exc)
        except _BROKEN as exc:
            return _broken_reason(exc)
        finally:
            self._requests = None
            self._update_ready("stream closed")
            await source.aclose()

    async def _read(self, stream: Stream[bytes, object], batched: bool) -> str:
        """Route the host's events until it ends the stream; say how it ended."""
        route = self._route
        while (item := await stream.recv_message()) is not None:
            if batched:
                for event in item.events:  # type: ignore[attr-defined]
                    route(event)
            else:
                route(item)  # type: ignore[arg-type]
        # The host closed its side: its status is in the trailers, read once ours is ended.
        await stream.end()
        await stream.recv_trailing_metadata()  # raises GRPCError unless OK
        return ENDED

    def _use_process(self) -> None:
        self._batched = False
        log.info("the handler host has no ProcessBatch (an older image): using Process")

    def _route(self, event: runner_pb2.Event) -> None:
        events = self._pending.get(event.delivery_id)
        if events is None:
            # Its caller gave up (shutdown): the result has nowhere to go.
            log.debug("event for delivery %d that nobody waits for", event.delivery_id)
            return
        events.put(event)

    def _fail_pending(self, why: str) -> None:
        error = HandlerUnavailable(why)
        for events in self._pending.values():
            events.put(error)


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
        if isinstance(item, HandlerUnavailable):
            raise HandlerUnavailable(item.reason)  # one instance per caller
        if item.WhichOneof("kind") == "result":
            return item.result
        await on_early_reply(item.early_reply)


async def _first_ending(*coroutines: Coroutine[None, None, str]) -> str:
    """Run the coroutines until one ends; cancel the others; its result (or error) is ours."""
    tasks = [asyncio.create_task(coroutine) for coroutine in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return done.pop().result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _write(stream: Stream[bytes, object], source: AsyncIterator[bytes]) -> str:
    """Send what `source` gives, each as one stream message, until it ends."""
    async for data in source:
        await stream.send_message(data)
    return "the stream was closed"


async def _one_by_one(requests: asyncio.Queue[_Request | None]) -> AsyncIterator[bytes]:
    """Process's request side: each serialized Delivery, in the order they were queued."""
    while (request := await requests.get()) is not None:
        yield b"".join(request.parts)


async def _batches(
    requests: asyncio.Queue[_Request | None], cap: int = BATCH_BYTES
) -> AsyncIterator[bytes]:
    """ProcessBatch's request side: every Delivery queued so far, as one DeliveryBatch.

    A batch stops before it would pass `cap` bytes, framing included; one Delivery alone
    may be bigger (the caller checked it against the gRPC limit).
    """
    held: list[_Request | None] = []  # what did not fit in the last batch (or the end)
    while True:
        request = held.pop() if held else await requests.get()
        if request is None:
            return
        prefix = _framing(request)
        parts = [prefix, *request.parts]
        size = len(prefix) + request.size
        while not requests.empty():
            more = requests.get_nowait()
            if more is None:  # the end, once this batch is out
                held.append(None)
                break
            prefix = _framing(more)
            if size + len(prefix) + more.size > cap:  # the next batch's first
                held.append(more)
                break
            parts += (prefix, *more.parts)
            size += len(prefix) + more.size
        yield b"".join(parts)


def _framing(request: _Request) -> bytes:
    """What precedes a Delivery in a DeliveryBatch: the field's tag and the length."""
    return _DELIVERIES_TAG + _varint(request.size)


def _method_name(batched: bool) -> str:
    return "ProcessBatch" if batched else "Process"


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _status_name(status: int) -> str:
    return _STATUS_NAMES.get(status, f"status {status}")


def _rpc_reason(exc: GRPCError) -> str:
    return f"{exc.status.name}: {exc.message}"


def _ended_ok(stream: Stream[bytes, object]) -> bool:
    """The host sent OK trailers: grpcio then resets the stream (NO_ERROR) if our side is
    still open, and grpclib raises StreamTerminatedError for the reset. (A stream that
    had sent nothing ends with one block of headers that carries the status.)"""
    h2_stream = getattr(stream, "_stream", None)
    last = getattr(h2_stream, "trailers", None) or getattr(h2_stream, "headers", None)
    return last is not None and dict(last).get("grpc-status") == "0"


def _unexpected_reason(exc: BaseException) -> str:
    return f"INTERNAL: {type(exc).__name__}: {exc}"


def _broken_reason(exc: BaseException) -> str:
    """What a connection or stream failure says, for a log line and /readyz."""
    if isinstance(exc, ConnectionRefusedError | FileNotFoundError):
        return f"UNAVAILABLE: cannot connect ({exc.strerror or exc})"
    if isinstance(exc, StreamTerminatedError):
        return f"UNAVAILABLE: the stream was reset ({exc})"
    return f"UNAVAILABLE: {type(exc).__name__}: {exc}"
