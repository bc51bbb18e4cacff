"""One input message's life, from the fetched bytes to its single ending.

decode -> Delivery -> handler host (early replies published on the way) -> ask
`outcome.decide` -> publish and await the PubAck -> ack / nak / term. The consumer
loop (`sidecar.consumer`) starts one `MessageProcessor.handle` task per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import nats.errors
from google.protobuf import any_pb2, timestamp_pb2
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from protos import runner_pb2
from protos.kre_nats_msg_pb2 import KreNatsMessage
from sidecar import envelope, metrics
from sidecar.channel import HandlerChannel
from sidecar.errors import BadInputError, HandlerUnavailable, PayloadTooLargeError
from sidecar.outcome import (
    Ack,
    Action,
    BadInput,
    DeadLetterAndTerm,
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
    decide,
)
from sidecar.settings import SidecarSettings

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT = 5.0
PUBLISH_ERRORS = (nats.errors.Error, asyncio.TimeoutError, OSError)


@dataclass
class InFlight:
    """A fetched message; `settled` once its ack / nak / term has been decided and sent."""

    msg: Msg
    settled: bool = False


class MessageProcessor:
    """Runs messages through the handler host and settles each one exactly once."""

    def __init__(
        self, settings: SidecarSettings, js: JetStreamContext, channel: HandlerChannel
    ) -> None:
        self.settings = settings
        self._js = js
        self._channel = channel
        self._policy = Policy.from_settings(settings)

    async def handle(self, record: InFlight) -> None:
        msg = record.msg
        async with _keep_alive(msg, self.settings.ack_wait / 3):
            try:
                facts, happened = await self._process(msg)
            except Exception as exc:
                # A bug here must not strand the message: it still gets exactly one ending.
                log.exception("unexpected error processing stream seq %d", _seq(msg))
                facts, happened = Facts(None, _attempt(msg)), Unavailable(f"sidecar error: {exc!r}")
            action = decide(happened, facts, self._policy)
            await self._settle(record, action, facts)

    async def _process(self, msg: Msg) -> tuple[Facts, Happened]:
        attempt = _attempt(msg)
        try:
            request = envelope.decode_input(msg.data, self.settings.max_message_bytes)
        except BadInputError as exc:
            return Facts(None, attempt), BadInput(exc.reason)
        replies = _EarlyReplies(self, msg, request)
        delivery = runner_pb2.Delivery(
            message=request,
            subject=msg.subject,
            stream_sequence=_seq(msg),
            attempt=attempt,
            headers=_passed_on(msg.headers),
        )
        started = datetime.now(UTC)
        try:
            with metrics.HANDLER_SECONDS.time():
                result = await self._channel.call(delivery, replies.send)
        except HandlerUnavailable as exc:
            happened: Happened = Unavailable(exc.reason)
        else:
            happened = replies.failure or _from_result(result, started, datetime.now(UTC))
        return Facts(request, attempt, early_replied=replies.sent), happened

    async def _settle(self, record: InFlight, action: Action, facts: Facts) -> None:
        try:
            await self._publish_for(record.msg, action)
        except PUBLISH_ERRORS as exc:
            log.warning("publish for stream seq %d failed: %s", _seq(record.msg), describe(exc))
            if not isinstance(action, DeadLetterAndTerm):
                action = decide(PublishFailed(describe(exc)), facts, self._policy)
                # A dead letter is terminated even when its envelope cannot be published.
                with contextlib.suppress(*PUBLISH_ERRORS):
                    await self._publish_for(record.msg, action)
        await self._finish(record, action, facts)

    async def _publish_for(self, msg: Msg, action: Action) -> None:
        match action:
            case PublishThenAck(subject=subject, data=data):
                await self.publish(subject, data, self.msg_id(msg))
                metrics.PUBLISHED.labels(kind="output").inc()
            case (
                PublishErrorThenAck(subject=subject, data=data)
                | DeadLetterAndTerm(subject=subject, data=data)
            ) if data:
                await self.publish(subject, data, self.msg_id(msg))
                metrics.PUBLISHED.labels(kind="error").inc()

    async def _finish(self, record: InFlight, action: Action, facts: Facts) -> None:
        record.settled = True
        metrics.MESSAGES.labels(outcome=action.outcome).inc()
        msg, seq = record.msg, _seq(record.msg)
        try:
            match action:
                case Ack() | PublishThenAck():
                    await msg.ack()
                case PublishErrorThenAck(envelope=error):
                    log.warning(
                        "stream seq %d (tracking id %s) failed, error envelope published: %s",
                        seq,
                        facts.tracking_id or "-",
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
                case DeadLetterAndTerm(reason=reason):
                    log.error(
                        "stream seq %d (tracking id %s) dead-lettered: %s",
                        seq,
                        facts.tracking_id or "-",
                        reason,
                    )
                    await msg.term()
        except nats.errors.Error as exc:
            log.warning("could not settle stream seq %d (%s): it will be redelivered", seq, exc)

    async def publish(self, subject: str, data: bytes, msg_id: str) -> None:
        """Publish through JetStream and wait for the PubAck (Nats-Msg-Id dedups retries)."""
        ack = await self._js.publish(
            subject, data, timeout=PUBLISH_TIMEOUT, headers={"Nats-Msg-Id": msg_id}
        )
        if ack.duplicate:
            log.debug("publish %s was a duplicate: an earlier attempt had landed", msg_id)

    def msg_id(self, msg: Msg) -> str:
        return f"{self.settings.nats_stream}:{_seq(msg)}:{self.settings.node_name}"


@dataclass
class _EarlyReplies:
    """Publishes one message's early replies to the entrypoint; remembers what went wrong."""

    processor: MessageProcessor
    msg: Msg
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
            data = envelope.encode(reply, settings.max_payload_bytes)
            msg_id = self.processor.msg_id(self.msg) + ":early"
            await self.processor.publish(settings.entrypoint_subject, data, msg_id)
        except PayloadTooLargeError as exc:
            self.failure = Raised(f"early reply: {exc}")
        except PUBLISH_ERRORS as exc:
            self.failure = PublishFailed(f"early reply: {describe(exc)}")
        else:
            self.sent = True
            metrics.PUBLISHED.labels(kind="early_reply").inc()


@contextlib.asynccontextmanager
async def _keep_alive(msg: Msg, interval: float) -> AsyncIterator[None]:
    """Send in-progress acks while the message is being worked on, so it is not redelivered."""

    async def tick() -> None:
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(nats.errors.Error):
                await msg.in_progress()

    ticker = asyncio.create_task(tick())
    try:
        yield
    finally:
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)


def _from_result(result: runner_pb2.Result, started: datetime, ended: datetime) -> Happened:
    kind = result.WhichOneof("outcome")
    if kind == "failure":
        failure = result.failure
        return Raised(failure.message or failure.type, failure.type, failure.retryable)
    payload = result.payload if kind == "payload" else None
    return Returned(payload, _when(result.start) or started, _when(result.end) or ended)


def _when(stamp: timestamp_pb2.Timestamp) -> datetime | None:
    if stamp.seconds == 0 and stamp.nanos == 0:
        return None
    return stamp.ToDatetime(tzinfo=UTC)


def _passed_on(headers: dict[str, str] | None) -> dict[str, str]:
    # JetStream's own headers (Nats-Msg-Id, Nats-Expected-*) mean nothing to the handler.
    return {k: v for k, v in (headers or {}).items() if not k.startswith("Nats-")}


def _seq(msg: Msg) -> int:
    return msg.metadata.sequence.stream


def _attempt(msg: Msg) -> int:
    return msg.metadata.num_delivered


def describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
