"""Exactly one ending per message, even when settling it hits a bug in the sidecar."""

from __future__ import annotations

from typing import Any

import pytest
from nats.aio.msg import Msg

from sidecar.message import InFlight, MessageProcessor
from sidecar.settings import SidecarSettings

ENV = {
    "KRT_NODE_NAME": "node-a",
    "KRT_NATS_SERVER": "nats://127.0.0.1:4222",
    "KRT_NATS_INPUT": "wf.node-a.in",
    "KRT_NATS_OUTPUT": "wf.node-a.out",
    "KRT_NATS_STREAM": "wf",
}


class RecordingMsg(Msg):
    """A fetched JetStream message that records how it was settled."""

    def __init__(self) -> None:
        reply = "$JS.ACK.wf.node-a.2.42.9.1700000000000000000.0"
        super().__init__(
            _client=None, subject="wf.node-a.in", reply=reply, data=b"not a KRE envelope"
        )  # type: ignore[arg-type]
        self.endings: list[tuple[str, Any]] = []

    async def nak(self, delay: float | None = None) -> None:
        self.endings.append(("nak", delay))

    async def ack(self) -> None:
        self.endings.append(("ack", None))

    async def term(self, reason: str = "") -> None:
        self.endings.append(("term", reason))

    async def in_progress(self) -> None:
        pass


async def test_a_bug_while_settling_naks_the_message_once(monkeypatch) -> None:
    processor = MessageProcessor(SidecarSettings.from_env(ENV), js=None, channel=None)  # type: ignore[arg-type]

    async def broken_settle(*args: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(processor, "_settle", broken_settle)
    msg = RecordingMsg()
    record = InFlight(msg)

    await processor.handle(record)

    assert record.settled
    assert [ending for ending, _ in msg.endings] == ["nak"]
    assert msg.endings[0][1] == pytest.approx(processor.policy.backoff(2))


async def test_big_payload_work_leaves_the_event_loop() -> None:
    import threading

    from sidecar.message import OFF_LOOP_BYTES, _off_loop_if_big

    def where() -> str:
        return threading.current_thread().name

    loop_thread = threading.current_thread().name
    assert await _off_loop_if_big(OFF_LOOP_BYTES - 1, where) == loop_thread
    assert await _off_loop_if_big(OFF_LOOP_BYTES, where) != loop_thread


async def test_a_gzipped_input_reports_its_gunzipped_size_and_reaches_the_host_whole() -> None:
    import gzip

    from google.protobuf import any_pb2, wrappers_pb2

    from protos import runner_pb2
    from protos.kre_nats_msg_pb2 import KreNatsMessage

    payload = any_pb2.Any()
    payload.Pack(wrappers_pb2.BytesValue(value=b"abc" * 100_000))
    envelope = KreNatsMessage(tracking_id="t-1", payload=payload)
    plain = envelope.SerializeToString()
    msg = RecordingMsg()
    msg.data = gzip.compress(plain)
    decoded: list[int] = []
    sent: list[runner_pb2.Delivery] = []

    class Channel:
        async def call(self, delivery: runner_pb2.Delivery, on_early: Any, message: bytes) -> Any:
            delivery.message.ParseFromString(message)
            sent.append(delivery)
            return runner_pb2.Result()  # the handler returned None

    settings = SidecarSettings.from_env(ENV)
    processor = MessageProcessor(
        settings,
        js=None,  # type: ignore[arg-type]
        channel=Channel(),  # type: ignore[arg-type]
        on_decoded=lambda record, size: decoded.append(size),
    )
    record = InFlight(msg, size=len(msg.data))

    facts, _ = await processor._process(record)

    assert decoded == [len(plain)]  # the consumer counts that in its window
    assert sent[0].message == envelope  # the whole envelope, payload included
    assert facts.tracking_id == "t-1"


async def test_a_big_early_reply_is_gzipped_off_the_event_loop_and_published(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gzip
    import threading

    from google.protobuf import any_pb2, wrappers_pb2

    from protos.kre_nats_msg_pb2 import KreNatsMessage
    from sidecar import envelope
    from sidecar.message import _EarlyReplies

    settings = SidecarSettings.from_env({**ENV, "KRT_NATS_ENTRYPOINT_SUBJECT": "wf.entry"})
    processor = MessageProcessor(settings, js=None, channel=None)  # type: ignore[arg-type]
    published: list[tuple[str, bytes, str]] = []

    async def publish(subject: str, data: bytes, msg_id: str) -> None:
        published.append((subject, data, msg_id))

    encoded_on: list[str] = []
    encode = envelope.encode

    def recording_encode(*args: Any) -> bytes:
        encoded_on.append(threading.current_thread().name)
        return encode(*args)

    monkeypatch.setattr(processor, "publish", publish)
    monkeypatch.setattr(envelope, "encode", recording_encode)
    payload = any_pb2.Any()
    payload.Pack(wrappers_pb2.BytesValue(value=b"early " * 400_000))  # 2.4 MB: over 1 MiB
    replies = _EarlyReplies(processor, 42, KreNatsMessage(tracking_id="t-9"))

    await replies.send(payload)

    assert replies.sent and replies.failure is None
    assert encoded_on and encoded_on[0] != threading.current_thread().name
    [(subject, data, msg_id)] = published
    assert (subject, msg_id) == ("wf.entry", "wf:42:node-a:early")
    reply = KreNatsMessage.FromString(gzip.decompress(data))
    assert reply.tracking_id == "t-9" and reply.replied and reply.payload == payload
