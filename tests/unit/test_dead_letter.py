"""The dead-letter message: original bytes, the reason and where it came from, in headers."""

from __future__ import annotations

from nats.aio.msg import Msg

from sidecar import deadletter
from sidecar.binding import subject_matches


def fetched(data: bytes, headers: dict[str, str] | None = None, seq: int = 42) -> Msg:
    # JetStream's ack subject carries the metadata: stream, consumer, delivered, seqs, time.
    reply = f"$JS.ACK.wf.node-a.3.{seq}.9.1700000000000000000.0"
    return Msg(_client=None, subject="wf.node-a.in", reply=reply, data=data, headers=headers)  # type: ignore[arg-type]


def test_the_dead_letter_carries_the_original_bytes_and_the_reason() -> None:
    letter = deadletter.build(
        fetched(b"\x1f\x8bnot gzip", {"Nats-Msg-Id": "x", "Trace": "t-9"}),
        reason="bad input: bad gzip data:\nline two",
        node="node-a",
        stream="wf",
        tracking_id="",
    )
    assert letter.data == b"\x1f\x8bnot gzip"
    h = letter.headers
    assert h["Nats-Msg-Id"] == letter.msg_id == "wf:42:node-a:dlq"
    assert h["Kre-Dlq-Reason"] == "bad input: bad gzip data: line two"  # one line
    assert (h["Kre-Dlq-Node"], h["Kre-Dlq-Stream"], h["Kre-Dlq-Sequence"]) == ("node-a", "wf", "42")
    assert h["Kre-Dlq-Subject"] == "wf.node-a.in"
    assert h["Kre-Dlq-Attempts"] == "3"
    assert h["Kre-Dlq-Size"] == "10"
    assert h["Kre-Dlq-Time"].endswith("Z")
    assert h["Trace"] == "t-9"  # the input's own headers are kept...
    assert "Kre-Dlq-Tracking-Id" not in h and "Kre-Dlq-Truncated" not in h


def test_a_tracking_id_is_kept_and_long_reasons_are_cut() -> None:
    letter = deadletter.build(
        fetched(b"x"), reason="r" * 5000, node="n", stream="s", tracking_id="t-1"
    )
    assert letter.headers["Kre-Dlq-Tracking-Id"] == "t-1"
    assert len(letter.headers["Kre-Dlq-Reason"]) == deadletter.MAX_REASON_CHARS


def test_data_is_cut_to_fit_the_server_max_payload_with_the_headers() -> None:
    data = bytes(range(256)) * 40  # 10 KiB
    letter = deadletter.build(
        fetched(data), reason="too big", node="n", stream="s", tracking_id="t", max_payload=8192
    )
    assert letter.headers["Kre-Dlq-Truncated"] == "true"
    assert letter.headers["Kre-Dlq-Size"] == str(len(data))
    assert data.startswith(letter.data)
    assert len(letter.data) + deadletter.header_size(letter.headers) <= 8192
    small = deadletter.build(
        fetched(b"ok"), reason="r", node="n", stream="s", tracking_id="t", max_payload=8192
    )
    assert small.data == b"ok" and "Kre-Dlq-Truncated" not in small.headers


def test_subject_matching_follows_nats_wildcards() -> None:
    assert subject_matches("wf.out.dlq", "wf.out.dlq")
    assert subject_matches("wf.*.dlq", "wf.out.dlq")
    assert subject_matches("wf.>", "wf.out.dlq")
    assert not subject_matches("wf.>", "wf")
    assert not subject_matches("wf.*", "wf.out.dlq")
    assert not subject_matches("wf.out", "wf.out.dlq")
    assert not subject_matches("wf.out.dlq.x", "wf.out.dlq")
