"""`position`: a message's stream sequence and attempt, read as nats-py reads them."""

from __future__ import annotations

import pytest
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError

from sidecar.message import position

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
