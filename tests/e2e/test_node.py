"""A KRE node end to end: real nats-server, the sidecar and the handler host as subprocesses."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections import Counter

import pytest
from google.protobuf.wrappers_pb2 import StringValue
from nats.js import JetStreamContext

from deploy.local.client import Downstream, Upstream, request_envelope
from deploy.local.node import NodeConfig
from protos.kre_nats_msg_pb2 import KreNatsMessage

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def words(envelope: KreNatsMessage) -> str:
    value = StringValue()
    assert envelope.payload.Unpack(value), envelope.payload.type_url
    return value.value


async def wait_settled(js: JetStreamContext, stream: str, durable: str, timeout: float = 60):
    """Until the node's consumer has nothing pending and nothing waiting for an ack."""
    deadline = time.monotonic() + timeout
    while True:
        info = await js.consumer_info(stream, durable)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return info
        assert time.monotonic() < deadline, f"consumer not settled: {info}"
        await asyncio.sleep(0.05)


async def test_thousand_requests_get_thousand_replies(js, stream, node_config, make_node):
    make_node(node_config).start()
    downstream = await Downstream(js, stream, node_config.output_subject).start()
    requests = [request_envelope(StringValue(value=f"w{i}")) for i in range(1000)]

    await Upstream(js, node_config.input_subject).send_all(requests)
    replies = await downstream.wait_for(1000, timeout=120)

    assert len(replies) == 1000 and downstream.duplicates() == 0
    by_id = downstream.by_tracking_id()
    for i, request in enumerate(requests):
        reply = by_id[request.tracking_id]
        assert words(reply) == f"echo w{i}"
        assert not reply.error
        assert reply.reply == request.reply
        assert [t.node_name for t in reply.tracking] == ["entrypoint", "words"]
        assert reply.tracking[0] == request.tracking[0]  # the previous node's entry, kept
        assert reply.tracking[1].start <= reply.tracking[1].end
        # KRE's form: naive UTC, six fraction digits (kre-py and kre-go parse only that).
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}", reply.tracking[1].end)
    info = await wait_settled(js, stream, "words")
    assert info.num_redelivered == 0


async def test_raising_handler_gives_one_error_envelope_and_no_redelivery(
    js, stream, node_config, make_node
):
    make_node(node_config).start()
    out, entry = node_config.output_subject, node_config.entrypoint_subject
    downstream = await Downstream(js, stream, out, entry).start()
    texts = [f"fail:{i}" if i % 2 else f"ok{i}" for i in range(100)] + ["none:quiet"]
    requests = [request_envelope(StringValue(value=t)) for t in texts]

    await Upstream(js, node_config.input_subject).send_all(requests)
    replies = await downstream.wait_for(100, timeout=60)
    info = await wait_settled(js, stream, "words")
    await downstream.poll(timeout=0.5)  # a redelivery would show up as a second envelope

    assert len(replies) == 100 and downstream.duplicates() == 0
    by_id = downstream.by_tracking_id()
    for i, request in enumerate(requests[:100]):
        reply = by_id[request.tracking_id]
        if i % 2:  # to the entrypoint, as KRE's runners do: the workflow stops there
            assert reply.error == f"error in 'words': refusing '{i}'"
            assert not reply.HasField("payload")
            assert downstream.subject_of[request.tracking_id] == entry
        else:
            assert words(reply) == f"echo ok{i}" and not reply.error
            assert downstream.subject_of[request.tracking_id] == out
    assert requests[100].tracking_id not in by_id  # None publishes nothing
    assert info.num_redelivered == 0
    assert info.delivered.consumer_seq == len(requests)  # each input delivered exactly once


async def test_sigterm_to_sidecar_mid_load_then_restart_answers_everything(
    js, stream, node_config: NodeConfig, make_node
):
    node = make_node(node_config).start()
    downstream = await Downstream(js, stream, node_config.output_subject).start()
    # 50 ms each, 64 in flight: about 0.8 s of load, so the signal lands in the middle.
    requests = [request_envelope(StringValue(value=f"slow:r{i}")) for i in range(1000)]
    await Upstream(js, node_config.input_subject).send_all(requests)

    await downstream.wait_for(150, timeout=60)
    assert len(downstream.received) < 1000, "load finished before the signal: nothing tested"
    exit_code = node.stop_sidecar(timeout=30, sig=signal.SIGTERM)
    assert exit_code == 0, node.logs()
    answered_before_restart = len(downstream.received)

    node.start_sidecar()
    node.wait_ready()
    await downstream.wait_for(1000, timeout=120)

    counts = Counter(m.tracking_id for m in downstream.received)
    assert set(counts) == {r.tracking_id for r in requests}
    assert downstream.duplicates() == 0, [t for t, n in counts.items() if n > 1][:5]
    assert answered_before_restart >= 150
    await wait_settled(js, stream, "words")
