"""What the message path reads: a message's position, the host's Result and its stamps."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from google.protobuf import any_pb2
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError

from protos import runner_pb2
from sidecar.message import _from_result
from sidecar.outcome import Raised, Returned
from sidecar.pull import position

V1 = "$JS.ACK.wf.node-a.3.1042.77.1700000000123456789.5"
V2 = "$JS.ACK.hub.ACCHASH.wf.node-a.3.1042.77.1700000000123456789.5.rnd"
V2_SHORT = "$JS.ACK._.ACCHASH.wf.node-a.2.9.8.1700000000123456789.0"


@pytest.mark.parametrize("reply", [V1, V2, V2_SHORT])
def test_position_is_what_nats_py_metadata_says(reply: str) -> None:
    msg = Msg(None, subject="wf.in", reply=reply, data=b"x")  # type: ignore[arg-type]
    meta = msg.metadata
    assert position(msg) == (meta.sequence.stream, meta.num_delivered)


def test_v1_ack_subject_fields() -> None:
    msg = Msg(None, subject="wf.in", reply=V1, data=b"x")  # type: ignore[arg-type]
    assert position(msg) == (1042, 3)


@pytest.mark.parametrize("reply", ["", "_INBOX.abc.1", "$JS.ACK.too.short"])
def test_a_message_not_from_jetstream_is_nats_pys_error(reply: str) -> None:
    msg = Msg(None, subject="wf.in", reply=reply, data=b"x")  # type: ignore[arg-type]
    with pytest.raises(NotJSMessageError):
        position(msg)


def test_a_result_keeps_the_hosts_own_stamps_to_the_microsecond() -> None:
    result = runner_pb2.Result(payload=any_pb2.Any(type_url="t/x", value=b"v"))
    result.start.FromDatetime(datetime(2024, 5, 1, 12, 0, 0, 123456))
    result.end.FromDatetime(datetime(2024, 5, 1, 12, 0, 1, 654321))

    happened = _from_result(result, time.time_ns())

    assert isinstance(happened, Returned)
    assert happened.start == datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    assert happened.end == datetime(2024, 5, 1, 12, 0, 1, 654321, tzinfo=UTC)
    assert happened.payload is not None and happened.payload.value == b"v"


def test_a_result_without_stamps_is_timed_by_the_sidecar() -> None:
    sent = time.time_ns()
    happened = _from_result(runner_pb2.Result(payload=any_pb2.Any(type_url="t/x")), sent)

    assert isinstance(happened, Returned)
    assert abs(happened.start.timestamp() - sent / 1e9) < 2e-6
    assert happened.start <= happened.end <= datetime.now(UTC)


def test_a_failure_result_is_raised_with_its_retry_flag() -> None:
    failure = runner_pb2.Failure(message="boom", type="ValueError", retryable=True)
    happened = _from_result(runner_pb2.Result(failure=failure), time.time_ns())
    assert happened == Raised("boom", "ValueError", True)
