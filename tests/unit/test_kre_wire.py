"""Byte and behaviour compatibility with KRE's own runners (kre-py, kre-go).

The expected bytes are written out by hand from KRE's `kre_nats_msg.proto` field
layout (tracking_id=1, tracking=2 {node_name=1, start=2, end=3}, reply=3, Any
payload=4, error=5, replied=6, early_exit=7), not produced by our generated code, so
a change of field number, type or order in `protos/` fails here. The tracking times
are checked the way kre-py and kre-go read them.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf import any_pb2, wrappers_pb2

from handler_host.timing import parse_stamp
from protos.kre_nats_msg_pb2 import KreNatsMessage
from sidecar import envelope
from sidecar.outcome import (
    Facts,
    Policy,
    PublishErrorThenAck,
    PublishThenAck,
    Raised,
    Returned,
    UpstreamError,
    decide,
)

# kre-go parses tracking times with the layout 2006-01-02T15:04:05.000000: exactly this.
KRE_GO_LAYOUT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}$")
START = datetime(2022, 8, 19, 10, 0, 0, 250, tzinfo=UTC)
END = datetime(2022, 8, 19, 10, 0, 0, 4250, tzinfo=UTC)
POLICY = Policy(
    "nodeB",
    "runtime1-greeter-v1-Greet.nodeC",
    "runtime1-greeter-v1-Greet.entrypoint",
    entrypoint_subject="runtime1-greeter-v1-Greet.entrypoint",
)


# A minimal protobuf wire encoder: enough to spell KRE's envelope out by hand.


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _text(field: int, value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _flag(field: int) -> bytes:
    return _varint(field << 3 | 0) + b"\x01"


def _tracking(node: str, start: str, end: str) -> bytes:
    return _text(2, _text(1, node) + _text(2, start) + _text(3, end))


def _any(type_url: str, value: bytes) -> bytes:
    return _text(4, _text(1, type_url) + _text(2, value))


GREETING = wrappers_pb2.StringValue(value="Hello, Ada!")
GREETING_ANY = _any("type.googleapis.com/google.protobuf.StringValue", GREETING.SerializeToString())
ENTRYPOINT_TRACKING = _tracking(
    "greeter-entrypoint", "2022-08-19T10:00:00", "2022-08-19T10:00:00.000100"
)
NODE_A_TRACKING = _tracking("nodeA", "2022-08-19T10:00:00.000120", "2022-08-19T10:00:00.000200")
NODE_B_TRACKING = _tracking("nodeB", "2022-08-19T10:00:00.000250", "2022-08-19T10:00:00.004250")


# Node B's output, field by field: tracking_id, the three tracking entries, reply, payload.
NODE_B_OUTPUT = (
    _text(1, "7b1c")
    + ENTRYPOINT_TRACKING
    + NODE_A_TRACKING
    + NODE_B_TRACKING
    + _text(3, "req-42")
    + GREETING_ANY
)


def kre_py_input(**fields: object) -> KreNatsMessage:
    """What kre-py's node A publishes to node B: its times are `utcnow().isoformat()`,
    with no fraction at all when the microseconds happen to be 0 (the entrypoint's)."""
    msg = KreNatsMessage(tracking_id="7b1c", reply="req-42", **fields)  # type: ignore[arg-type]
    msg.tracking.add(
        node_name="greeter-entrypoint",
        start="2022-08-19T10:00:00",
        end="2022-08-19T10:00:00.000100",
    )
    msg.tracking.add(
        node_name="nodeA", start="2022-08-19T10:00:00.000120", end="2022-08-19T10:00:00.000200"
    )
    msg.payload.Pack(wrappers_pb2.StringValue(value="Ada"))
    return msg


def packed(message: wrappers_pb2.StringValue) -> any_pb2.Any:
    payload = any_pb2.Any()
    payload.Pack(message)
    return payload


def test_output_envelope_bytes_are_kres() -> None:
    action = decide(Returned(packed(GREETING), START, END), Facts(kre_py_input(), 1), POLICY)

    assert isinstance(action, PublishThenAck)
    assert action.subject == "runtime1-greeter-v1-Greet.nodeC"
    assert action.envelope.SerializeToString() == NODE_B_OUTPUT


def test_early_exit_envelope_bytes_are_a_plain_output_sent_to_the_entrypoint() -> None:
    happened = Returned(packed(GREETING), START, END, early_exit=True)
    action = decide(happened, Facts(kre_py_input(), 1), POLICY)

    assert isinstance(action, PublishThenAck)
    assert action.subject == "runtime1-greeter-v1-Greet.entrypoint"
    # kre-py builds the output afresh, so field 7 is not on the wire.
    assert action.envelope.SerializeToString() == NODE_B_OUTPUT


def test_early_exit_flag_has_kres_field_number() -> None:
    assert KreNatsMessage(early_exit=True).SerializeToString() == _flag(7)
    assert KreNatsMessage.FromString(_flag(7)).early_exit is True


def test_early_reply_envelope_bytes() -> None:
    reply = envelope.build_early_reply(kre_py_input(), packed(GREETING))

    assert reply.SerializeToString() == (
        _text(1, "7b1c")
        + ENTRYPOINT_TRACKING
        + NODE_A_TRACKING
        + _text(3, "req-42")
        + GREETING_ANY
        + _flag(6)
    )


def test_error_envelope_bytes_go_to_the_entrypoint_and_not_downstream() -> None:
    action = decide(Raised("name is empty"), Facts(kre_py_input(), 1), POLICY)

    assert isinstance(action, PublishErrorThenAck)
    assert action.subject == "runtime1-greeter-v1-Greet.entrypoint"
    assert action.envelope.SerializeToString() == (
        _text(1, "7b1c")
        + ENTRYPOINT_TRACKING
        + NODE_A_TRACKING
        + _text(3, "req-42")
        + _text(5, "error in 'nodeB': name is empty")
    )


def test_an_upstream_error_envelope_is_forwarded_unchanged_to_the_entrypoint() -> None:
    # What kre-py 9824f56 sends downstream when its handler raises: only `error` set.
    upstream = KreNatsMessage(error="error in 'nodeA': boom")

    action = decide(UpstreamError(), Facts(upstream, 1), POLICY)

    assert isinstance(action, PublishErrorThenAck)
    assert action.subject == "runtime1-greeter-v1-Greet.entrypoint"
    assert action.envelope.SerializeToString() == _text(5, "error in 'nodeA': boom")


def test_tracking_times_are_written_as_kre_writes_them() -> None:
    action = decide(Returned(packed(GREETING), START, END), Facts(kre_py_input(), 1), POLICY)
    assert isinstance(action, PublishThenAck)
    ours = action.envelope.tracking[-1]

    for stamp in (ours.start, ours.end):
        assert KRE_GO_LAYOUT.match(stamp), stamp
        # Python 3.9's fromisoformat (kre-py's image) reads exactly what isoformat() writes.
        assert datetime.fromisoformat(stamp).isoformat() == stamp
    # kre-py's own arithmetic: a naive utcnow() minus the previous node's end.
    waiting = datetime(2022, 8, 19, 10, 0, 1) - datetime.fromisoformat(ours.end)
    assert waiting == timedelta(microseconds=1_000_000 - 4250)


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (datetime(2024, 5, 1, 12, 0, 0, 123, tzinfo=UTC), "2024-05-01T12:00:00.000123"),
        (datetime(2024, 5, 1, 2, 3, 4, 5), "2024-05-01T02:03:04.000005"),  # naive: UTC
        (datetime(2024, 5, 1, 12, 0, tzinfo=UTC), "2024-05-01T12:00:00.000000"),  # 6 zeros
        (datetime(2024, 12, 31, 23, 59, 59, 999999), "2024-12-31T23:59:59.999999"),
        # An offset moves the date too: 00:30 at +02:00 is the day before in UTC.
        (
            datetime(2024, 3, 1, 0, 30, 0, 7, tzinfo=timezone(timedelta(hours=2))),
            "2024-02-29T22:30:00.000007",
        ),
    ],
)
def test_tracking_time_exact_format(moment: datetime, text: str) -> None:
    assert envelope.tracking_time(moment) == text


@pytest.mark.parametrize(
    "text",
    [
        "2022-07-18T10:00:00.000000",  # ours, kre-go's
        "2022-07-18T10:00:00",  # kre-py's isoformat() when the microseconds are 0
        "2022-07-18T10:00:00.000",  # milliseconds
        "2022-07-18T10:00:00.000000000",  # nanoseconds (Go's RFC3339Nano digits)
        "2022-07-18T10:00:00Z",
        "2022-07-18T10:00:00.000000Z",  # this runner's earlier form
        "2022-07-18T12:00:00.000000+02:00",
        "2022-07-18T05:30:00-04:30",
        "2022-07-18 10:00:00.000000",
    ],
)
def test_every_form_of_tracking_time_is_read(text: str) -> None:
    assert parse_stamp(text) == datetime(2022, 7, 18, 10, 0, tzinfo=UTC)


def test_tracking_time_round_trips() -> None:
    moment = datetime(2023, 12, 31, 22, 59, 58, 1, tzinfo=UTC)
    for _ in range(500):
        moment += timedelta(seconds=3607, microseconds=7919)
        assert parse_stamp(envelope.tracking_time(moment)) == moment
        assert parse_stamp(envelope.tracking_time(moment.replace(tzinfo=None))) == moment


@pytest.mark.parametrize("text", ["", "yesterday", "2022-13-01T00:00:00", "12:00"])
def test_a_bad_tracking_time_is_none(text: str) -> None:
    assert parse_stamp(text) is None
