"""One input message's life, from the fetched bytes to its single ending.

decode -> Delivery -> handler host (early replies published on the way) -> ask
`outcome.decide` -> publish and await the PubAck -> ack / nak / term. The consumer
loop (`sidecar.consumer`) starts one `MessageProcessor.handle` task per message.
A dead letter publishes the error envelope and the dead-letter message
(`sidecar.deadletter`) and is terminated only when both have landed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import nats.errors
from google.protobuf import any_pb2, timestamp_pb2
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck

from protos import runner_pb2
from protos.kre_nats_msg_pb2 import KreNatsMessage
from sidecar import deadletter, envelope, logs, metrics
from sidecar.channel import HandlerChannel
from sidecar.errors import BadInputError, HandlerUnavailable, PayloadTooLargeError
from sidecar.outcome import (
    Ack,
    Action,
    BadInput,
    DeadLetterAndTerm,
    DeadLetterFailed,
    Exhausted,
    Facts,
    Happened,
    Nak,
    Policy,
    PublishErrorThenAck,
    PublishFailed,
    PublishThenAck,
    Raised,
    Returned,
    Unavailable,
    UpstreamError,
    decide,
)
from sidecar.pubacks import PubAcks
from sidecar.settings import SidecarSettings

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT = 5.0
PUBLISH_ERRORS = (nats.errors.Error, asyncio.TimeoutError, OSError)
# A Delivery's id and its framing, on top of the message itself, under the gRPC limit.
DELIVERY_ROOM = 32
# Above this many bytes, gzip and gunzip run in a worker thread, not on the event loop.
OFF_LOOP_BYTES = 256 * 1024
_T = TypeVar("_T")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The threads that gzip and gunzip big messages. Two: more would not find more cores in
# a sidecar's CPU limit, and each thread's allocations fragment a malloc arena of its own.
_ZLIB_THREADS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kre-zlib")


@dataclass
class InFlight:
    """A fetched message; `settled` once its ack / nak / term has been decided and sent.

    `size`: its bytes as fetched, counted by the window. `pinged_at`: when JetStream last
    heard of it (fetched, or its last in-progress ack), on `time.monotonic()`; the
    consumer's keep-alive task sends the in-progress acks. `seq` and `attempt`: its
    stream sequence and delivery attempt, read once when its processing starts.
    """

    msg: Msg
    settled: bool = False
    size: int = 0
    pinged_at: float = field(default_factory=time.monotonic)
    seq: int = 0
    attempt: int = 0


class MessageProcessor:
    """Runs messages through the handler host and settles each one exactly once."""

    def __init__(
        self,
        settings: SidecarSettings,
        js: JetStreamContext,
        channel: HandlerChannel,
        max_payload: int | None = None,
        on_decoded: Callable[[InFlight, int], None] | None = None,
        pub_acks: PubAcks | None = None,
    ) -> None:
        self.settings = settings
        # How outputs are published; without one (tests of other parts), `js.publish`.
        self._pub_acks = pub_acks
        # Told each input's decoded (gunzipped) size: the consumer's byte accounting.
        self._on_decoded = on_decoded
        self._js = js
        self._channel = channel
        self._max_payload = max_payload  # the NATS server's, headers included
        self._policy = Policy.from_settings(settings, max_payload)

    @property
    def policy(self) -> Policy:
        return self._policy

    async def handle(self, record: InFlight) -> None:
        msg = record.msg
        record.seq, record.attempt = position(msg)
        logs.bind(record.seq, record.attempt)
        try:
            facts, happened = await self._process(record)
        except Exception as exc:
            # A bug here must not strand the message: it still gets exactly one ending.
            log.exception("unexpected error processing stream seq %d", record.seq)
            facts, happened = Facts(None, record.attempt), Unavailable(f"sidecar error: {exc!r}")
        try:
            await self._settle(record, await self._decide(happened, facts), facts)
        except Exception:
            # Still one ending: a message we could not settle comes back, never strands.
            log.exception("unexpected error settling stream seq %d", record.seq)
            if not record.settled:
                record.settled = True
                with contextlib.suppress(Exception):
                    await msg.nak(delay=self._policy.backoff(facts.attempt))

    async def _decide(self, happened: Happened, facts: Facts) -> Action:
        """`decide`, in a worker thread when it will gzip a big output (a pure function)."""
        size = (
            happened.payload.ByteSize()
            if isinstance(happened, Returned) and happened.payload
            else 0
        )
        return await _off_loop_if_big(size, decide, happened, facts, self._policy)

    async def _process(self, record: InFlight) -> tuple[Facts, Happened]:
        msg, attempt = record.msg, record.attempt
        _count_input(msg.data, attempt)
        try:
            request, plain = await _off_loop_if_big(
                len(msg.data), envelope.decode, msg.data, self.settings.max_message_bytes
            )
        except BadInputError as exc:
            return Facts(None, attempt), BadInput(exc.reason)
        if self._on_decoded is not None:
            self._on_decoded(record, len(plain))
        logs.tag(tracking_id=request.tracking_id, traceparent=_header(msg, "traceparent"))
        if attempt > self.settings.max_deliver:
            return Facts(request, attempt), Exhausted()
        if request.error:
            return Facts(request, attempt), UpstreamError()
        # The envelope goes to the host as the bytes it came in (gunzipped), not re-encoded
        # from `request`; nothing here reads the request's payload again, so it is dropped
        # now rather than held in memory for as long as the handler runs.
        request.ClearField("payload")
        delivery = runner_pb2.Delivery(
            subject=msg.subject, stream_sequence=record.seq, attempt=attempt
        )
        headers = _passed_on(msg.headers)
        if headers:  # an empty map given to the constructor costs more than the rest of it
            delivery.headers.update(headers)
        size = delivery.ByteSize() + len(plain) + DELIVERY_ROOM
        limit = self.settings.grpc_max_message_bytes
        if size > limit:
            # Sent anyway it would break the stream that every other message shares.
            reason = f"message is {size} bytes for the handler host, over the {limit} byte gRPC"
            return Facts(request, attempt), BadInput(f"{reason} limit (KRT_GRPC_MAX_MESSAGE_BYTES)")
        replies = _EarlyReplies(self, record.seq, request)
        started = time.time_ns()  # for a Result without the host's own stamps
        clock = time.perf_counter()
        try:
            result = await self._channel.call(delivery, replies.send, message=plain)
        except HandlerUnavailable as exc:
            happened: Happened = Unavailable(exc.reason)
        else:
            metrics.HANDLER_SECONDS.observe(time.perf_counter() - clock)
            happened = replies.failure or _from_result(result, started)
        return Facts(request, attempt, early_replied=replies.sent), happened

    async def _settle(self, record: InFlight, action: Action, facts: Facts) -> None:
        action = await self._publish_or_retry(record, action, facts)
        await self._finish(record, action, facts)

    async def _publish_or_retry(self, record: InFlight, action: Action, facts: Facts) -> Action:
        """Publish what `action` says; when that fails, the action to take instead."""
        try:
            await self._publish_for(record, action, facts)
            return action
        except PUBLISH_ERRORS as exc:
            reason = describe(exc)
            log.warning("publish for stream seq %d failed: %s", record.seq, reason)
        if isinstance(action, DeadLetterAndTerm):
            return decide(DeadLetterFailed(reason), facts, self._policy)
        action = decide(PublishFailed(reason), facts, self._policy)
        if isinstance(action, DeadLetterAndTerm):  # the last attempt: dead-letter it instead
            return await self._publish_or_retry(record, action, facts)
        return action

    async def _publish_for(self, record: InFlight, action: Action, facts: Facts) -> None:
        match action:
            case PublishThenAck(subject=subject, data=data):
                await self.publish(subject, data, self.msg_id(record.seq))
                metrics.published("output").inc()
            case PublishErrorThenAck(subject=subject, data=data):
                await self.publish(subject, data, self.msg_id(record.seq))
                metrics.published("error").inc()
            case DeadLetterAndTerm():
                await self._dead_letter(record, action, facts)

    async def _dead_letter(self, record: InFlight, action: DeadLetterAndTerm, facts: Facts) -> None:
        # The dead letter first: while its subject cannot take it (a stream missing it is
        # the likely cause), nothing at all goes downstream, so a retry that outlasts the
        # duplicate window cannot repeat the error envelope.
        letter = deadletter.build(
            record.msg,
            reason=action.reason,
            node=self.settings.node_name,
            stream=self.settings.nats_stream,
            tracking_id=facts.tracking_id,
            max_payload=self._max_payload,
        )
        ack = await self._publish_acked(action.dlq_subject, letter.data, letter.headers)
        if not ack.duplicate:
            metrics.published("dead_letter").inc()
        if action.data:
            await self.publish(action.subject, action.data, self.msg_id(record.seq))
            metrics.published("error").inc()

    async def _finish(self, record: InFlight, action: Action, facts: Facts) -> None:
        record.settled = True
        metrics.settled(action.outcome).inc()
        msg, seq = record.msg, record.seq
        try:
            match action:
                case Ack() | PublishThenAck():
                    await msg.ack()
                case PublishErrorThenAck(envelope=error, outcome=outcome):
                    what = "forwarded" if outcome == "error_forwarded" else "failed,"
                    log.warning(
                        "stream seq %d (tracking id %s) %s error envelope published: %s",
                        seq,
                        facts.tracking_id or "-",
                        what,
                        error.error,
                    )
                    await msg.ack()
                case Nak(delay=delay, reason=reason):
                    log.warning(
                        "stream seq %d attempt %d retried in %.1fs: %s",
                        seq,
                        facts.attempt,
                        delay,
                        reason,
                    )
                    await msg.nak(delay=delay)
                case DeadLetterAndTerm(reason=reason, dlq_subject=dlq):
                    log.error(
                        "stream seq %d (tracking id %s, attempt %d) dead-lettered to %s: %s",
                        seq,
                        facts.tracking_id or "-",
                        facts.attempt,
                        dlq,
                        reason,
                    )
                    await msg.term()
        except nats.errors.Error as exc:
            log.warning("could not settle stream seq %d (%s): it will be redelivered", seq, exc)

    async def publish(self, subject: str, data: bytes, msg_id: str) -> None:
        """Publish through JetStream and wait for the PubAck (Nats-Msg-Id dedups retries)."""
        clock = time.perf_counter()
        ack = await self._publish_acked(subject, data, {"Nats-Msg-Id": msg_id})
        metrics.PUBLISH_SECONDS.observe(time.perf_counter() - clock)
        metrics.BYTES_OUT.inc(len(data))
        if envelope.is_compressed(data):
            metrics.COMPRESSED.inc()
        if ack.duplicate:
            log.debug("publish %s was a duplicate: an earlier attempt had landed", msg_id)

    async def _publish_acked(self, subject: str, data: bytes, headers: dict[str, str]) -> PubAck:
        """One JetStream publish and its PubAck, for outputs and dead letters alike."""
        if self._pub_acks is not None:
            return await self._pub_acks.publish(subject, data, headers, PUBLISH_TIMEOUT)
        return await self._js.publish(subject, data, timeout=PUBLISH_TIMEOUT, headers=headers)

    def msg_id(self, seq: int) -> str:
        """The Nats-Msg-Id of what this node publishes for stream sequence `seq`."""
        return f"{self.settings.nats_stream}:{seq}:{self.settings.node_name}"


@dataclass
class _EarlyReplies:
    """Publishes one message's early replies to the entrypoint; remembers what went wrong."""

    processor: MessageProcessor
    seq: int  # the input's stream sequence, for the replies' Nats-Msg-Id
    request: KreNatsMessage
    sent: bool = False
    failure: Happened | None = None

    async def send(self, payload: any_pb2.Any) -> None:
        if self.failure is not None:
            return
        settings = self.processor.settings
        if not settings.entrypoint_subject:
            self.failure = Raised("early reply needs KRT_NATS_ENTRYPOINT_SUBJECT, which is not set")
            return
        reply = envelope.build_early_reply(self.request, payload)
        try:
            data = await _off_loop_if_big(  # a big one is gzipped in a worker thread
                payload.ByteSize(),
                envelope.encode,
                reply,
                settings.max_payload_bytes,
                self.processor.policy.publish_limit,
            )
            msg_id = self.processor.msg_id(self.seq) + ":early"  # only when one is sent
            await self.processor.publish(settings.entrypoint_subject, data, msg_id)
        except PayloadTooLargeError as exc:
            self.failure = Raised(f"early reply: {exc}")
        except PUBLISH_ERRORS as exc:
            self.failure = PublishFailed(f"early reply: {describe(exc)}")
        else:
            self.sent = True
            metrics.published("early_reply").inc()


def _from_result(result: runner_pb2.Result, started_ns: int) -> Happened:
    kind = result.WhichOneof("outcome")
    if kind == "failure":
        failure = result.failure
        return Raised(failure.message or failure.type, failure.type, failure.retryable)
    payload = result.payload if kind == "payload" else None
    start = _when(result.start) or _EPOCH + timedelta(microseconds=started_ns // 1000)
    end = _when(result.end) or datetime.now(UTC)
    return Returned(payload, start, end, early_exit=result.early_exit)


def _when(stamp: timestamp_pb2.Timestamp) -> datetime | None:
    """The host's stamp; None when unset. (`ToDatetime` takes half as long again.)"""
    if stamp.seconds == 0 and stamp.nanos == 0:
        return None
    return _EPOCH + timedelta(seconds=stamp.seconds, microseconds=stamp.nanos // 1000)


def _passed_on(headers: dict[str, str] | None) -> dict[str, str]:
    # JetStream's own headers (Nats-Msg-Id, Nats-Expected-*) mean nothing to the handler.
    return {k: v for k, v in (headers or {}).items() if not k.startswith("Nats-")}


async def _off_loop_if_big(size: int, fn: Callable[..., _T], *args: Any) -> _T:
    """Run `fn` in a worker thread when `size` means seconds of (de)compression.

    zlib releases the GIL, so a 2 MB gzip no longer stalls every other message's
    acks, publishes and in-progress pings on the event loop.
    """
    if size < OFF_LOOP_BYTES:
        return fn(*args)
    # In the caller's context, as asyncio.to_thread does: log lines there keep their tags.
    run = functools.partial(contextvars.copy_context().run, fn, *args)
    return await asyncio.get_running_loop().run_in_executor(_ZLIB_THREADS, run)


def _header(msg: Msg, name: str) -> str:
    return next((v for k, v in (msg.headers or {}).items() if k.lower() == name), "")


def _count_input(data: bytes, attempt: int) -> None:
    metrics.BYTES_IN.inc(len(data))
    if envelope.is_compressed(data):
        metrics.DECOMPRESSED.inc()
    if attempt > 1:
        metrics.REDELIVERIES.inc()


def position(msg: Msg) -> tuple[int, int]:
    """A JetStream message's stream sequence and delivery attempt, from its ack subject.

    What `msg.metadata` holds, read the way nats-py reads it, without building the rest
    (two dataclasses and a datetime: 5 us a message in nats-py 2.16, this 0.5).
    """
    tokens = msg.reply.split(".") if msg.reply else ()
    if len(tokens) >= 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        if len(tokens) == 9:  # $JS.ACK.stream.consumer.delivered.sseq.cseq.ts.pending
            return int(tokens[5]), int(tokens[4])
        if len(tokens) >= 11:  # v2: $JS.ACK.domain.hash.stream.consumer.delivered.sseq...
            return int(tokens[7]), int(tokens[6])
    meta = msg.metadata  # not a JetStream message: nats-py's own error
    return meta.sequence.stream, meta.num_delivered


def describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
