"""Exactly one ending per message, whatever fails while it is settled."""

from __future__ import annotations

import gzip
import threading
from typing import Any

import nats.errors
import pytest
from google.protobuf import any_pb2, wrappers_pb2
from nats.aio.msg import Msg
from nats.js.api import PubAck

from protos import runner_pb2
from protos.kre_nats_msg_pb2 import KreNatsMessage
from sidecar import envelope, metrics
from sidecar.message import OFF_LOOP_BYTES, InFlight, MessageProcessor, _off_loop_if_big
from sidecar.publisher import Publisher
from sidecar.settings import SidecarSettings

ENV = {
    "KRT_NODE_NAME": "node-a",
    "KRT_NATS_SERVER": "nats://127.0.0.1:4222",
    "KRT_NATS_INPUT": "wf.node-a.in",
    "KRT_NATS_OUTPUT": "wf.node-a.out",
    "KRT_NATS_STREAM": "wf",
    "KRT_NATS_ENTRYPOINT_SUBJECT": "wf.entry",
    "KRT_MAX_DELIVER": "3",
}


OUTCOMES = (
    "published",
    "retried",
    "dead_lettered",
    "dead_letter_retried",
    "error_published",
    "settle_failed",
    "abandoned",
)


class RecordingMsg(Msg):
    """A fetched JetStream message that records how it was settled."""

    def __init__(self, data: bytes = b"not a KRE envelope", attempt: int = 1) -> None:
        reply = f"$JS.ACK.wf.node-a.{attempt}.42.9.1700000000000000000.0"
        super().__init__(_client=None, subject="wf.node-a.in", reply=reply, data=data)  # type: ignore[arg-type]
        self.endings: list[tuple[str, Any]] = []

    async def nak(self, delay: float | None = None) -> None:
        self.endings.append(("nak", delay))

    async def ack(self) -> None:
        self.endings.append(("ack", None))

    async def term(self, reason: str = "") -> None:
        self.endings.append(("term", reason))

    async def in_progress(self) -> None:
        pass


class FakeJetStream:
    """Records publishes; subjects in `failing` raise as an unreachable stream would."""

    def __init__(self, failing: set[str] | None = None) -> None:
        self.failing = failing or set()
        self.published: list[tuple[str, bytes, dict[str, str]]] = []

    async def publish(
        self, subject: str, data: bytes, timeout: float, headers: dict[str, str]
    ) -> PubAck:
        if subject in self.failing:
            raise nats.errors.TimeoutError
        self.published.append((subject, data, headers))
        return PubAck(stream="wf", seq=len(self.published))

    def subjects(self) -> list[str]:
        return [subject for subject, _, _ in self.published]


class Channel:
    """A handler host whose handler answers every delivery with `result`."""

    ready = True

    def __init__(self, result: runner_pb2.Result | None = None) -> None:
        self.result = result or runner_pb2.Result()
        self.sent: list[runner_pb2.Delivery] = []

    async def call(self, delivery: runner_pb2.Delivery, on_early: Any, message: bytes) -> Any:
        delivery.message.ParseFromString(message)
        self.sent.append(delivery)
        return self.result


def make(
    js: FakeJetStream | None = None, channel: Channel | None = None, **env: str
) -> MessageProcessor:
    settings = SidecarSettings.from_env({**ENV, **env})
    publisher = Publisher(js or FakeJetStream(), "wf", "node-a")  # type: ignore[arg-type]
    return MessageProcessor(settings, channel or Channel(), publisher)  # type: ignore[arg-type]


def request(text: str = "in") -> bytes:
    payload = any_pb2.Any()
    payload.Pack(wrappers_pb2.StringValue(value=text))
    return KreNatsMessage(tracking_id="t-1", payload=payload).SerializeToString()


def returning(text: str) -> runner_pb2.Result:
    result = runner_pb2.Result()
    result.payload.Pack(wrappers_pb2.StringValue(value=text))
    return result


async def run(processor: MessageProcessor, msg: RecordingMsg) -> InFlight:
    record = InFlight(msg, size=len(msg.data))
    processor.prepare(record)
    await processor.process(record, await processor.decode(record))
    return record


def settled_counts() -> dict[str, float]:
    return {outcome: metrics.settled(outcome).value for outcome in OUTCOMES}


def counted_since(before: dict[str, float]) -> dict[str, float]:
    return {k: v - before[k] for k, v in settled_counts().items() if v != before[k]}


async def test_an_output_is_published_then_acked_and_counted_once() -> None:
    js = FakeJetStream()
    before = settled_counts()

    msg = RecordingMsg(request())
    await run(make(js, Channel(returning("out"))), msg)

    assert js.subjects() == ["wf.node-a.out"]
    assert js.published[0][2] == {"Nats-Msg-Id": "wf:42:node-a"}
    assert msg.endings == [("ack", None)]
    assert counted_since(before) == {"published": 1}


async def test_a_failed_publish_at_the_last_attempt_is_dead_lettered_instead() -> None:
    js = FakeJetStream(failing={"wf.node-a.out"})
    before = settled_counts()

    msg = RecordingMsg(request(), attempt=3)
    await run(make(js, Channel(returning("out"))), msg)

    # The dead letter, then the error envelope to the entrypoint, then term: one ending.
    assert js.subjects() == ["wf.node-a.out.dlq", "wf.entry"]
    assert "gave up after 3 attempts: publish failed" in js.published[0][2]["Kre-Dlq-Reason"]
    assert [ending for ending, _ in msg.endings] == ["term"]
    assert counted_since(before) == {"dead_lettered": 1}


async def test_a_failed_publish_before_the_last_attempt_is_nakked_with_backoff() -> None:
    processor = make(FakeJetStream(failing={"wf.node-a.out"}), Channel(returning("out")))

    msg = RecordingMsg(request(), attempt=2)
    await run(processor, msg)

    assert msg.endings == [("nak", processor.policy.backoff(2))]


async def test_a_dead_letter_that_cannot_land_is_nakked_never_termed() -> None:
    js = FakeJetStream(failing={"wf.node-a.out.dlq"})
    before = settled_counts()

    msg = RecordingMsg(b"\xff not an envelope")
    await run(make(js), msg)

    assert js.published == []  # no error envelope before its dead letter
    assert [ending for ending, _ in msg.endings] == ["nak"]
    assert counted_since(before) == {"dead_letter_retried": 1}


async def test_an_output_too_large_once_gzipped_becomes_an_error_envelope() -> None:
    import os

    js = FakeJetStream()
    huge = returning(os.urandom(20_000).hex())  # over the 1,000 byte limit even gzipped

    msg = RecordingMsg(request())
    await run(make(js, Channel(huge), KRT_MAX_PAYLOAD_BYTES="1000"), msg)

    [(subject, data, _)] = js.published
    assert subject == "wf.entry"
    assert "bytes after gzip, over the" in KreNatsMessage.FromString(data).error
    assert msg.endings == [("ack", None)]


async def test_a_bug_while_settling_naks_the_message_once(monkeypatch) -> None:
    processor = make()
    before = settled_counts()

    async def broken_publish(*args: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(processor, "_publish_for", broken_publish)
    msg = RecordingMsg()
    record = await run(processor, msg)

    assert record.settled
    assert msg.endings == [("nak", pytest.approx(processor.policy.backoff(1)))]
    assert counted_since(before) == {"settle_failed": 1}


async def test_an_abandoned_message_is_nakked_at_once_and_counted_once() -> None:
    processor = make()
    before = settled_counts()
    msg = RecordingMsg(request())
    record = InFlight(msg)

    await processor.abandon(record)
    await processor.abandon(record)  # already settled: nothing more

    assert msg.endings == [("nak", None)]
    assert counted_since(before) == {"abandoned": 1}


async def test_big_payload_work_leaves_the_event_loop() -> None:
    def where() -> str:
        return threading.current_thread().name

    loop_thread = threading.current_thread().name
    assert await _off_loop_if_big(OFF_LOOP_BYTES - 1, where) == loop_thread
    assert await _off_loop_if_big(OFF_LOOP_BYTES, where) != loop_thread


async def test_a_gzipped_input_decodes_to_its_gunzipped_bytes_and_reaches_the_host_whole() -> None:
    payload = any_pb2.Any()
    payload.Pack(wrappers_pb2.BytesValue(value=b"abc" * 100_000))
    whole = KreNatsMessage(tracking_id="t-1", payload=payload)
    plain = whole.SerializeToString()
    channel = Channel()
    processor = make(channel=channel)
    record = InFlight(RecordingMsg(gzip.compress(plain)))

    assert processor.prepare(record) == len(plain)  # charged before decompressing
    decoded = await processor.decode(record)
    await processor.process(record, decoded)

    assert decoded.plain == plain  # the consumer counts its size in the window
    assert channel.sent[0].message == whole  # the whole envelope, payload included


async def test_a_big_early_reply_is_gzipped_off_the_event_loop_and_published(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    js = FakeJetStream()
    processor = make(js)
    encoded_on: list[str] = []
    encode = envelope.encode

    def recording_encode(*args: Any) -> bytes:
        encoded_on.append(threading.current_thread().name)
        return encode(*args)

    monkeypatch.setattr(envelope, "encode", recording_encode)
    payload = any_pb2.Any()
    payload.Pack(wrappers_pb2.BytesValue(value=b"early " * 400_000))  # 2.4 MB: over 1 MiB
    replies = processor._early_replies(42, KreNatsMessage(tracking_id="t-9"))

    await replies.send(payload)

    assert replies.sent and replies.failure is None
    assert encoded_on and encoded_on[0] != threading.current_thread().name
    [(subject, data, headers)] = js.published
    assert (subject, headers) == ("wf.entry", {"Nats-Msg-Id": "wf:42:node-a:early"})
    reply = KreNatsMessage.FromString(gzip.decompress(data))
    assert reply.tracking_id == "t-9" and reply.replied and reply.payload == payload


async def test_an_early_reply_without_an_entrypoint_subject_fails_the_message() -> None:
    processor = make(KRT_NATS_ENTRYPOINT_SUBJECT="")
    replies = processor._early_replies(42, KreNatsMessage(tracking_id="t-9"))

    await replies.send(any_pb2.Any())

    assert not replies.sent
    assert replies.failure is not None and "KRT_NATS_ENTRYPOINT_SUBJECT" in str(replies.failure)


async def test_an_input_delivered_too_often_is_not_decompressed_again(monkeypatch) -> None:
    def refuse(*args: object) -> bytes:
        raise AssertionError("decompressed a message that was given up on")

    monkeypatch.setattr(envelope, "gunzip", refuse)
    js = FakeJetStream()
    processor = make(js)
    msg = RecordingMsg(gzip.compress(request()), attempt=4)  # KRT_MAX_DELIVER is 3
    record = InFlight(msg, size=len(msg.data))

    assert processor.prepare(record) == len(msg.data)  # nothing more to charge
    await processor.process(record, await processor.decode(record))

    assert [ending for ending, _ in msg.endings] == ["term"]
    assert js.subjects() == ["wf.node-a.out.dlq", "wf.entry"]
