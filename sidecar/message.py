"""One input message's life, from the fetched bytes to its single ending.

The consumer (`sidecar.consumer`) owns each fetched message's record and the window;
per message it calls `decode`, counts the decoded size, then `process`: the Delivery
goes to the handler host (early replies published on the way), `outcome.decide` says
what to do, the publisher publishes it and awaits the PubAck, then the input is acked,
nak'ed or terminated. A dead letter publishes the dead-letter message
(`sidecar.deadletter`) and the error envelope, and is terminated only when both have
landed.
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
from google.protobuf import timestamp_pb2
from nats.aio.msg import Msg

from protos import runner_pb2
from protos.kre_nats_msg_pb2 import KreNatsMessage
from sidecar import deadletter, envelope, logs, metrics
from sidecar.channel import HandlerChannel, HostLost
from sidecar.early_replies import EarlyReplies
from sidecar.errors import (
    PUBLISH_ERRORS,
    BadInputError,
    HandlerUnavailable,
    PayloadTooLargeError,
    describe,
)
from sidecar.isolation import Suspects
from sidecar.outcome import (
    Abandoned,
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
    SettleFailed,
    Unavailable,
    UpstreamError,
    decide,
)
from sidecar.publisher import Publisher
from sidecar.pull import position
from sidecar.settings import SidecarSettings

log = logging.getLogger(__name__)

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

    `size`: its bytes in the window (as fetched; a gzipped one at its gunzipped size once
    decoded). `pinged_at`: when JetStream last heard of it (fetched, or its last
    in-progress ack), on `time.monotonic()`; the consumer's keep-alive task sends the
    in-progress acks. `seq` and `attempt`: its stream sequence and delivery attempt,
    read once when it is decoded.
    """

    msg: Msg
    settled: bool = False
    size: int = 0
    pinged_at: float = field(default_factory=time.monotonic)
    seq: int = 0
    attempt: int = 0
    # From `sidecar.isolation`: earlier deliveries that did not count, and whether this
    # one runs with nothing else in the handler host.
    excused: int = 0
    alone: bool = False


@dataclass(frozen=True)
class Decoded:
    """A fetched message, read: its envelope and plain (gunzipped) bytes, or what is
    wrong with it; `problem` set means the handler host is not called."""

    request: KreNatsMessage | None
    plain: bytes = b""
    problem: Happened | None = None


class MessageProcessor:
    """Runs messages through the handler host and settles each one exactly once."""

    def __init__(
        self,
        settings: SidecarSettings,
        channel: HandlerChannel,
        publisher: Publisher,
        max_payload: int | None = None,
        suspects: Suspects | None = None,
    ) -> None:
        self.settings = settings
        self._channel = channel
        self._publisher = publisher
        self._suspects = suspects if suspects is not None else Suspects()
        self._max_payload = max_payload  # the NATS server's, headers included
        self._policy = Policy.from_settings(settings, max_payload)

    @property
    def policy(self) -> Policy:
        return self._policy

    def prepare(self, record: InFlight) -> int:
        """Read the record's position; the bytes its decoding will hold.

        That is its decompressed size, as its gzip trailer declares it, when it will be
        gunzipped; its size as fetched otherwise (not gzipped, declaring more than
        KRT_MAX_MESSAGE_BYTES, or delivered too often to be read at all).
        """
        msg = record.msg
        record.seq, record.attempt = position(msg)
        logs.bind(record.seq, record.attempt)
        _count_input(msg.data, record.attempt)
        declared = envelope.declared_size(msg.data)
        if declared is None or declared > self.settings.max_message_bytes:
            return len(msg.data)
        if self._given_up(record):
            return len(msg.data)
        return max(declared, len(msg.data))

    def _given_up(self, record: InFlight) -> bool:
        """Delivered more than KRT_MAX_DELIVER times, counting only what counts.

        `exhausted` without building its Facts: this runs twice for every message.
        """
        return max(record.attempt - record.excused, 1) > self._policy.max_deliver

    async def decode(self, record: InFlight) -> Decoded:
        """Read the record's message (after `prepare`); never raises for a bad input."""
        msg = record.msg
        if self._given_up(record) and envelope.is_compressed(msg.data):
            # Given up on: not worth decompressing again. Its dead letter has the bytes.
            return Decoded(None, problem=Exhausted())
        try:
            request, plain = await _off_loop_if_big(
                len(msg.data), envelope.decode, msg.data, self.settings.max_message_bytes
            )
        except BadInputError as exc:
            return Decoded(None, problem=BadInput(exc.reason))
        logs.tag(tracking_id=request.tracking_id, traceparent=_header(msg, "traceparent"))
        if self._given_up(record):
            return Decoded(request, plain, Exhausted())
        if request.error:
            return Decoded(request, plain, UpstreamError())
        return Decoded(request, plain)

    async def process(self, record: InFlight, decoded: Decoded) -> None:
        """Run a decoded message through the handler host and settle it, exactly once."""
        facts = _facts(record, decoded.request)
        try:
            happened = decoded.problem
            if happened is None:
                facts, happened = await self._call_host(record, decoded)
        except Exception as exc:
            # A bug here must not strand the message: it still gets exactly one ending.
            log.exception("unexpected error processing stream seq %d", record.seq)
            happened = Unavailable(f"sidecar error: {exc!r}")
        try:
            await self._settle(record, happened, facts)
        except Exception as exc:
            # Still one ending: a message we could not settle comes back, never strands.
            log.exception("unexpected error settling stream seq %d", record.seq)
            if not record.settled:
                with contextlib.suppress(Exception):
                    await self._finish(
                        record, decide(SettleFailed(describe(exc)), facts, self._policy), facts
                    )

    async def abandon(self, record: InFlight) -> None:
        """End a message the sidecar will not finish: it stopped first."""
        if not record.settled:
            facts = Facts(None, record.attempt)
            await self._finish(record, decide(Abandoned(), facts, self._policy), facts)

    async def _call_host(self, record: InFlight, decoded: Decoded) -> tuple[Facts, Happened]:
        msg, attempt, request = record.msg, record.attempt, decoded.request
        assert request is not None
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
        size = delivery.ByteSize() + len(decoded.plain) + DELIVERY_ROOM
        limit = self.settings.grpc_max_message_bytes
        if size > limit:
            # Sent anyway it would break the stream that every other message shares.
            reason = f"message is {size} bytes for the handler host, over the {limit} byte gRPC"
            return _facts(record, request), BadInput(f"{reason} limit (KRT_GRPC_MAX_MESSAGE_BYTES)")
        if not self._channel.ready:
            # The host is (re)starting: a message bounced back to JetStream now would be
            # charged an attempt for a host it never reached. It waits, kept alive.
            await self._channel.wait_ready()
        replies = self._early_replies(record.seq, request)
        started = time.time_ns()  # for a Result without the host's own stamps
        clock = time.perf_counter()
        try:
            result = await self._channel.call(delivery, replies.send, message=decoded.plain)
        except HandlerUnavailable as exc:
            happened: Happened = Unavailable(exc.reason, in_host=isinstance(exc, HostLost))
        else:
            metrics.HANDLER_SECONDS.observe(time.perf_counter() - clock)
            happened = replies.failure or _from_result(result, started)
        return _facts(record, request, early_replied=replies.sent), happened

    def _early_replies(self, seq: int, request: KreNatsMessage) -> EarlyReplies:
        subject, publisher = self.settings.entrypoint_subject, self._publisher
        if not subject:
            return EarlyReplies(request, None, self._encode)

        async def publish(data: bytes) -> None:
            # Its Nats-Msg-Id is built only when a reply is sent: most messages send none.
            await publisher.publish("early_reply", subject, data, publisher.msg_id(seq) + ":early")

        return EarlyReplies(request, publish, self._encode)

    async def _settle(self, record: InFlight, happened: Happened, facts: Facts) -> None:
        """Decide, carry the action out; when that fails, decide again, and carry that out.

        It ends: a failed output becomes a nak or (at the last attempt) a dead letter, a
        failed dead letter a nak, an output too large an error envelope (never checked
        for size itself), and a nak publishes nothing.
        """
        action = decide(happened, facts, self._policy)
        while True:
            try:
                await self._publish_for(record, action, facts)
                break
            except PayloadTooLargeError as exc:
                action = decide(Raised(str(exc)), facts, self._policy)
            except PUBLISH_ERRORS as exc:
                reason = describe(exc)
                log.warning("publish for stream seq %d failed: %s", record.seq, reason)
                failed = (
                    DeadLetterFailed if isinstance(action, DeadLetterAndTerm) else PublishFailed
                )
                action = decide(failed(reason), facts, self._policy)
        await self._finish(record, action, facts)

    async def _publish_for(self, record: InFlight, action: Action, facts: Facts) -> None:
        msg_id = self._publisher.msg_id(record.seq)
        match action:
            case PublishThenAck(subject=subject, envelope=output):
                await self._publisher.publish("output", subject, await self._encode(output), msg_id)
            case PublishErrorThenAck(subject=subject, envelope=error, outcome="error_forwarded"):
                await self._publisher.publish("error", subject, await self._encode(error), msg_id)
            case PublishErrorThenAck(subject=subject, envelope=error):
                await self._publisher.publish("error", subject, error.SerializeToString(), msg_id)
            case DeadLetterAndTerm():
                await self._dead_letter(record, action, facts.tracking_id, msg_id)

    async def _encode(self, message: KreNatsMessage) -> bytes:
        """Serialized, and gzipped over the limit (in a worker thread when big)."""
        limits = (self.settings.max_payload_bytes, self._policy.publish_limit)
        return await _off_loop_if_big(message.ByteSize(), envelope.encode, message, *limits)

    async def _dead_letter(
        self, record: InFlight, action: DeadLetterAndTerm, tracking_id: str, msg_id: str
    ) -> None:
        # The dead letter first: while its subject cannot take it (a stream missing it is
        # the likely cause), nothing at all goes downstream, so a retry that outlasts the
        # duplicate window cannot repeat the error envelope.
        letter = deadletter.build(
            record.msg,
            reason=action.reason,
            node=self.settings.node_name,
            stream=self.settings.nats_stream,
            tracking_id=tracking_id,
            max_payload=self._max_payload,
        )
        await self._publisher.dead_letter(action.dlq_subject, letter.data, letter.headers)
        if action.envelope is not None:
            error = action.envelope.SerializeToString()
            await self._publisher.publish("error", action.subject, error, msg_id)

    async def _finish(self, record: InFlight, action: Action, facts: Facts) -> None:
        record.settled = True
        metrics.settled(action.outcome).inc()
        self._suspects.settled(record.seq, action)
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
                case Nak(outcome="abandoned"):  # the consumer logs how many, once
                    await msg.nak()
                case Nak(delay=delay, reason=reason):
                    log.warning(
                        "stream seq %d (tracking id %s) attempt %d retried in %.1fs: %s",
                        seq,
                        facts.tracking_id or "-",
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


def _facts(record: InFlight, request: KreNatsMessage | None, early_replied: bool = False) -> Facts:
    return Facts(request, record.attempt, early_replied, record.excused, record.alone)


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
    """The host's stamp; None when unset. (Cheaper than `ToDatetime`.)"""
    if stamp.seconds == 0 and stamp.nanos == 0:
        return None
    return _EPOCH + timedelta(seconds=stamp.seconds, microseconds=stamp.nanos // 1000)


def _passed_on(headers: dict[str, str] | None) -> dict[str, str]:
    # JetStream's own headers (Nats-Msg-Id, Nats-Expected-*) mean nothing to the handler.
    return {k: v for k, v in (headers or {}).items() if not k.startswith("Nats-")}


async def _off_loop_if_big(size: int, fn: Callable[..., _T], *args: Any) -> _T:
    """Run `fn` in a worker thread when `size` means seconds of (de)compression.

    zlib releases the GIL, so a 2 MB gzip does not stall every other message's
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
