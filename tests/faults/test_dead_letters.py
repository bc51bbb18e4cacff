"""Dead letters, in-process: the sidecar against a real nats-server and a fake handler host.

Every header and byte of the dead-letter message is checked here, quickly; the
subprocess cases in this folder check the same endings under load.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest
from google.protobuf.wrappers_pb2 import StringValue
from nats.js import JetStreamContext

from deploy.local.client import DeadLetters, Downstream, ensure_stream, request_envelope
from protos import runner_pb2
from tests.faults.harness import delivered
from tests.integration.test_sidecar_nats import NODE, Node, settled
from tests.unit.fake_handler_host import Emit, packed, text_of
from tests.waiting import eventually

pytestmark = [pytest.mark.faults, pytest.mark.timeout(90)]


@pytest.fixture
def folder() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="kre-dl-")  # short: Unix socket paths are limited
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def node(nats_server, js, stream_name: str, folder: str) -> AsyncIterator[Node]:  # type: ignore[no-untyped-def]
    n = Node(nats_server.url, stream_name, folder)
    await ensure_stream(js, stream_name, [n.input, n.output, n.entrypoint, n.dlq])
    yield n
    await n.close()
    await js.delete_stream(stream_name)


def bad_inputs() -> dict[str, bytes]:
    """Inputs that are not KRE envelopes, each with the reason the sidecar gives."""
    good = request_envelope(StringValue(value="x" * 200)).SerializeToString()
    return {
        "not a KreNatsMessage protobuf": b"\xff\xff\xff\xff not protobuf",
        "not a KreNatsMessage protobuf ": good[: len(good) // 2],  # truncated
        "bad gzip data": b"\x1f\x8b\x08\x00 this is not deflate data at all",
        "decompressed size is over": gzip.compress(b"\0" * (4 * 1024 * 1024)),  # a bomb
        "empty message": b"",
    }


async def test_bad_inputs_get_an_error_envelope_a_dead_letter_and_term(
    js: JetStreamContext, node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    await node.host()
    await node.sidecar(KRT_MAX_MESSAGE_BYTES=str(1024 * 1024), KRT_GRPC_MAX_MESSAGE_BYTES="65536")
    downstream = await Downstream(js, node.stream, node.output, node.entrypoint).start()
    letters = await DeadLetters(js, node.stream, node.dlq).start()
    inputs = bad_inputs()
    too_big = request_envelope(StringValue(value="y" * 100_000))
    inputs["over the 65536 byte gRPC limit"] = too_big.SerializeToString()
    good = request_envelope(StringValue(value="fine"))
    sequences = {}
    with caplog.at_level(logging.ERROR, logger="sidecar.message"):
        for reason, data in inputs.items():
            sequences[reason] = (await js.publish(node.input, data)).seq
        await js.publish(node.input, good.SerializeToString())
        outputs = await downstream.wait_for(len(inputs) + 1, timeout=20)
        await letters.wait_for(len(inputs), timeout=20)
        info = await settled(js, node)

    assert len(outputs) == len(inputs) + 1 and len(letters.received) == len(inputs)
    assert text_of(downstream.by_tracking_id()[good.tracking_id].payload) == "hello fine"
    by_seq = {letter.sequence: letter for letter in letters.received}
    for reason, data in inputs.items():
        letter = by_seq[sequences[reason]]
        assert letter.data == data  # the original bytes, for an operator to replay
        assert reason.strip() in letter.reason and letter.reason.startswith("bad input: ")
        assert letter.headers["Kre-Dlq-Node"] == NODE
        assert letter.headers["Kre-Dlq-Stream"] == node.stream
        assert letter.headers["Kre-Dlq-Subject"] == node.input
        assert letter.headers["Kre-Dlq-Attempts"] == "1"
    assert by_seq[sequences["over the 65536 byte gRPC limit"]].headers["Kre-Dlq-Tracking-Id"] == (
        too_big.tracking_id
    )
    errors = [m for m in outputs if m.error]
    assert len(errors) == len(inputs)
    assert all(m.error.startswith(f"error in '{NODE}': bad input: ") for m in errors)
    assert delivered(info) == len(inputs) + 1  # each delivered once, then termed
    dead_lines = [r for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert len(dead_lines) == len(inputs)  # one clear line each


async def test_retryable_failure_at_max_deliver_is_dead_lettered_with_the_reason(
    js: JetStreamContext, node: Node
) -> None:
    async def busy(d: runner_pb2.Delivery, emit: Emit) -> None:
        failure = runner_pb2.Failure(message="db busy", type="RetryableError", retryable=True)
        await emit(result=runner_pb2.Result(failure=failure))

    await node.host(busy)
    await node.sidecar(KRT_MAX_DELIVER="3")
    letters = await DeadLetters(js, node.stream, node.dlq).start()
    request = request_envelope(StringValue(value="x"))

    await js.publish(node.input, request.SerializeToString())
    [letter] = await letters.wait_for(1, timeout=20)
    await settled(js, node)

    assert letter.reason == "gave up after 3 attempts: retryable error: db busy"
    assert letter.headers["Kre-Dlq-Tracking-Id"] == request.tracking_id
    assert letter.headers["Kre-Dlq-Attempts"] == "3"
    assert letter.headers["Nats-Msg-Id"] == f"{node.stream}:1:{NODE}:dlq"


async def test_a_dead_letter_that_cannot_be_published_is_retried_never_termed(
    js: JetStreamContext, node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    await node.host()
    lost = f"{node.stream}.lost.dlq"
    await ensure_stream(js, node.stream, [lost])
    sidecar = await node.sidecar(KRT_NATS_DLQ_SUBJECT=lost)
    await eventually(lambda: sidecar.ready()[0])  # a stream captured it at start
    await drop_subject(js, node.stream, lost)  # then it is taken out of the stream
    with caplog.at_level(logging.WARNING):
        downstream = await Downstream(js, node.stream, node.output, node.entrypoint).start()
        await js.publish(node.input, b"\xff not an envelope")

        async def retried() -> bool:
            info = await js.consumer_info(node.stream, NODE)
            return delivered(info) >= 3

        await eventually(retried)
    assert "dead letter not published" in caplog.text
    await downstream.poll(timeout=0.5)
    assert downstream.received == []  # no error envelope before the dead letter has landed

    await ensure_stream(js, node.stream, [lost])  # the operator fixes the stream
    letters = await DeadLetters(js, node.stream, lost).start()
    [letter] = await letters.wait_for(1, timeout=20)
    info = await settled(js, node)

    assert letter.data == b"\xff not an envelope"
    # The error envelope goes out once the dead letter has landed, and only then.
    await downstream.wait_for(1, timeout=5)
    assert len(downstream.received) == 1 and downstream.received[0].error
    assert delivered(info) >= 3  # delivered again until the dead letter landed


async def drop_subject(js: JetStreamContext, stream: str, subject: str) -> None:
    info = await js.stream_info(stream)
    info.config.subjects = [s for s in info.config.subjects or [] if s != subject]
    await js.update_stream(info.config)


async def test_an_output_over_the_server_max_payload_is_an_error_envelope(
    js: JetStreamContext, node: Node
) -> None:
    async def huge(d: runner_pb2.Delivery, emit: Emit) -> None:
        blob = os.urandom(1_500_000).hex()  # incompressible, over 1 MiB even gzipped
        await emit(result=runner_pb2.Result(payload=packed(blob)))

    await node.host(huge)
    await node.sidecar(KRT_MAX_PAYLOAD_BYTES=str(8 * 1024 * 1024))  # the server's 1 MiB rules
    downstream = await Downstream(js, node.stream, node.output, node.entrypoint).start()
    request = request_envelope(StringValue(value="x"))

    await js.publish(node.input, request.SerializeToString())
    [error] = await downstream.wait_for(1, timeout=20)
    info = await settled(js, node)

    assert error.tracking_id == request.tracking_id
    assert "bytes after gzip, over the" in error.error and "max_payload" in error.error
    assert delivered(info) == 1  # acked at once: retrying cannot help
