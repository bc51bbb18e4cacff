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
