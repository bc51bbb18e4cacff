"""Binding the durable consumer against a real nats-server: conflicts and missing subjects.

The sidecar runs in-process with the fake handler host. Each problem must be logged once,
shown by /readyz while it lasts, and cleared by the operator's fix without a restart.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from google.protobuf.wrappers_pb2 import StringValue
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy

from deploy.local.client import Downstream, ensure_stream, request_envelope
from deploy.local.nats import NatsServer
from sidecar import consumer as consumer_module
from sidecar.main import Sidecar
from sidecar.settings import SidecarSettings
from tests.integration.test_sidecar_nats import NODE, Node, http_get
from tests.unit.fake_handler_host import text_of
from tests.waiting import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

OLD_DURABLE = f"v1-{NODE}"  # what kre-py names its consumer: <KRT_VERSION>-<KRT_NODE_NAME>
KRE_PY_ACK_WAIT = 22 * 3600.0


@pytest.fixture
def folder() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="kre-bind-")  # short: Unix socket paths are limited
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def node(
    nats_server: NatsServer, js: JetStreamContext, stream_name: str, folder: str
) -> AsyncIterator[Node]:
    """The node of `test_sidecar_nats`, its host started; each test makes its own stream."""
    n = Node(nats_server.url, stream_name, folder)
    await n.host()
    yield n
    await n.close()
    await js.delete_stream(stream_name)


@pytest.fixture
def start_sidecar(node: Node) -> Callable[..., Awaitable[Sidecar]]:
    return node.sidecar


@pytest.fixture
def attempts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Quick retries; each bind attempt (a call of ensure_consumer) is counted."""
    monkeypatch.setattr(consumer_module, "BIND_RETRY", 0.1)
    calls: list[str] = []
    ensure = consumer_module.ensure_consumer

    async def counted(js: JetStreamContext, settings: SidecarSettings) -> None:
        calls.append(settings.durable)
        await ensure(js, settings)

    monkeypatch.setattr(consumer_module, "ensure_consumer", counted)
    return calls


async def readyz(sidecar: Sidecar) -> tuple[int, str]:
    return await http_get(sidecar.http_port, "/readyz")


def errors_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "sidecar.consumer" and r.levelno >= logging.ERROR
    ]


async def test_a_kre_py_push_durable_is_refused_once_then_replaced_without_a_restart(
    js: JetStreamContext,
    node: Node,
    start_sidecar,  # type: ignore[no-untyped-def]
    attempts: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.consumer")
    await ensure_stream(js, node.stream, [node.input, node.output, node.entrypoint, node.dlq])
    # The consumer kre-py makes: push, a deliver group, only new messages, 22 h ack wait.
    await js.add_consumer(
        node.stream,
        ConsumerConfig(
            durable_name=OLD_DURABLE,
            deliver_subject=f"_kre.{node.stream}",
            deliver_group=OLD_DURABLE,
            deliver_policy=DeliverPolicy.NEW,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=KRE_PY_ACK_WAIT,
            filter_subject=node.input,
        ),
    )
    sidecar = await start_sidecar(KRT_NATS_DURABLE=OLD_DURABLE)
    downstream = await Downstream(js, node.stream, node.output).start()

    await eventually(lambda: len(attempts) >= 5)  # refused, retried a few times
    status, body = await readyz(sidecar)

    [error] = errors_of(caplog)  # once, not at every retry
    assert status == 503 and "consumer not bound" in body
    for text in (error, body):
        assert "(deliver policy can not be updated)" in text  # the server's own words
        assert f"push consumer (deliver subject _kre.{node.stream} and deliver group" in text
        assert "deliver policy is new, not all" in text
        assert "ack wait is 79200s, not 30s" in text
        assert f"nats consumer rm {node.stream} {OLD_DURABLE}" in text
        assert "KRT_NATS_DURABLE" in text
    assert sidecar.consumer is not None and not sidecar.consumer.bound

    await js.delete_consumer(node.stream, OLD_DURABLE)  # the operator's fix
    request = request_envelope(StringValue(value="after"))
    await js.publish(node.input, request.SerializeToString())

    [output] = await downstream.wait_for(1, timeout=20)
    assert text_of(output.payload) == "hello after"
    assert (await readyz(sidecar))[0] == 200
    info = await js.consumer_info(node.stream, OLD_DURABLE)
    assert info.config.deliver_subject is None and info.config.deliver_policy == "all"
    assert "recovered: consumer" in caplog.text
    assert len(errors_of(caplog)) == 1


async def test_a_dead_letter_subject_no_stream_captures_keeps_the_node_unready_until_added(
    js: JetStreamContext,
    node: Node,
    start_sidecar,  # type: ignore[no-untyped-def]
    attempts: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.consumer")
    # A KRE stream: interest retention, the dead-letter subject forgotten.
    await js.add_stream(
        name=node.stream,
        subjects=[node.input, node.output, node.entrypoint],
        retention=RetentionPolicy.INTEREST,
    )
    sidecar = await start_sidecar()
    downstream = await Downstream(js, node.stream, node.output).start()
    # Published once the durable exists: an interest stream keeps nothing for nobody.
    await eventually(lambda: "KRT_NATS_DLQ_SUBJECT" in _status(sidecar))
    request = request_envelope(StringValue(value="kept"))
    await js.publish(node.input, request.SerializeToString())

    await eventually(lambda: len(attempts) >= 5)
    status, body = await readyz(sidecar)

    [error] = errors_of(caplog)
    assert status == 503
    for text in (error, body):
        assert f"KRT_NATS_DLQ_SUBJECT={node.dlq} is captured by no stream" in text
        assert f"stream {node.stream} (now: {node.input}, {node.output}" in text
    info = await js.consumer_info(node.stream, NODE)
    assert info.delivered.stream_seq == 0 and info.num_pending == 1  # nothing fetched

    stream = await js.stream_info(node.stream)
    stream.config.subjects = [*(stream.config.subjects or []), node.dlq]
    await js.update_stream(stream.config)  # the operator's fix

    [output] = await downstream.wait_for(1, timeout=20)
    assert output.tracking_id == request.tracking_id  # kept by the durable meanwhile
    assert (await readyz(sidecar))[0] == 200
    assert len(errors_of(caplog)) == 1
    assert "recovered: consumer" in caplog.text
    # Nothing consumes the dead-letter subject of this interest stream: said once.
    dropped = [r for r in caplog.records if "drops every dead letter" in r.getMessage()]
    assert len(dropped) == 1 and dropped[0].levelno == logging.WARNING
    assert f"filter subject {node.dlq}" in dropped[0].getMessage()


async def test_a_dead_letter_consumer_on_an_interest_stream_silences_the_warning(
    js: JetStreamContext,
    node: Node,
    start_sidecar,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.consumer")
    await js.add_stream(
        name=node.stream,
        subjects=[f"{node.stream}.*"],  # as KRE makes them: one token under the stream
        retention=RetentionPolicy.INTEREST,
    )
    await js.add_consumer(
        node.stream,
        ConsumerConfig(durable_name="dead-letters", filter_subject=node.dlq),
    )
    sidecar = await start_sidecar()

    await eventually(lambda: sidecar.consumer is not None and sidecar.consumer.bound)

    assert "drops every dead letter" not in caplog.text
    assert errors_of(caplog) == []


async def test_migrating_from_kre_py_replays_what_the_old_durable_kept(
    js: JetStreamContext,
    node: Node,
    start_sidecar,  # type: ignore[no-untyped-def]
) -> None:
    """docs/migration.md: old replicas at 0, the new node started, then the old durable rm'ed."""
    await js.add_stream(
        name=node.stream, subjects=[f"{node.stream}.*"], retention=RetentionPolicy.INTEREST
    )
    await js.add_consumer(
        node.stream,
        ConsumerConfig(
            durable_name=OLD_DURABLE,
            deliver_subject=f"_kre.{node.stream}",
            deliver_group=OLD_DURABLE,
            deliver_policy=DeliverPolicy.NEW,
            ack_wait=KRE_PY_ACK_WAIT,
            filter_subject=node.input,
        ),
    )
    downstream = await Downstream(js, node.stream, node.output).start()
    requests = [request_envelope(StringValue(value=f"r{i}")) for i in range(3)]
    for request in requests:  # arrive while no runner runs: kept for the old durable
        await js.publish(node.input, request.SerializeToString())

    await start_sidecar()  # its own durable, KRT_NODE_NAME: no conflict
    outputs = await downstream.wait_for(3, timeout=20)

    assert {o.tracking_id for o in outputs} == {r.tracking_id for r in requests}
    assert downstream.duplicates() == 0
    assert await stored(js, node.stream, node.input) == 3  # acked, but the old durable holds

    await js.delete_consumer(node.stream, OLD_DURABLE)

    await eventually(lambda: _true_after(stored(js, node.stream, node.input), 0))


async def stored(js: JetStreamContext, stream: str, subject: str) -> int:
    info = await js.stream_info(stream, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def _true_after(count: Awaitable[int], wanted: int) -> bool:
    return await count == wanted


def _status(sidecar: Sidecar) -> str:
    return sidecar.consumer.status if sidecar.consumer else ""


async def test_a_second_node_with_the_same_durable_is_refused_and_the_first_keeps_its_input(
    js: JetStreamContext,
    node: Node,
    start_sidecar,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.consumer")
    other_input, other_output = f"{node.stream}.in2", f"{node.stream}.out2"
    await ensure_stream(
        js,
        node.stream,
        [node.input, node.output, other_input, other_output, node.entrypoint, node.dlq],
    )
    first = await start_sidecar(KRT_NATS_DURABLE="shared")
    await eventually(lambda: first.consumer is not None and first.consumer.bound)
    downstream = await Downstream(js, node.stream, node.output).start()

    second = await start_sidecar(
        KRT_NODE_NAME="node-y",
        KRT_NATS_DURABLE="shared",
        KRT_NATS_INPUT=other_input,
        KRT_NATS_OUTPUT=other_output,
    )
    await eventually(lambda: "takes" in _status(second))
    status, body = await readyz(second)

    assert status == 503
    [error] = errors_of(caplog)
    for text in (error, body):
        assert (
            f"consumer shared on stream {node.stream} takes {node.input}, not this node's "
            f"input {other_input}"
        ) in text
        assert "another node probably has KRT_NATS_DURABLE=shared too" in text
    info = await js.consumer_info(node.stream, "shared")
    assert info.config.filter_subject == node.input  # left as it is
    request = request_envelope(StringValue(value="mine"))
    await js.publish(node.input, request.SerializeToString())
    [output] = await downstream.wait_for(1, timeout=20)
    assert text_of(output.payload) == "hello mine"  # the first node still reads its input
    assert (await readyz(first))[0] == 200


async def test_an_input_its_stream_does_not_capture_keeps_the_node_unready_until_added(
    js: JetStreamContext,
    node: Node,
    start_sidecar,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.consumer")
    await js.add_stream(name=node.stream, subjects=[node.output, node.entrypoint, node.dlq])
    sidecar = await start_sidecar()
    downstream = await Downstream(js, node.stream, node.output).start()

    await eventually(lambda: "KRT_NATS_INPUT" in _status(sidecar))
    status, body = await readyz(sidecar)

    assert status == 503
    [error] = errors_of(caplog)
    for text in (error, body):
        assert f"KRT_NATS_INPUT={node.input} is captured by no stream" in text
        assert f"Add it to the subjects of stream {node.stream} (now: {node.output}" in text

    stream = await js.stream_info(node.stream)
    stream.config.subjects = [*(stream.config.subjects or []), node.input]
    await js.update_stream(stream.config)  # the operator's fix
    await eventually(lambda: sidecar.consumer is not None and sidecar.consumer.bound)
    request = request_envelope(StringValue(value="late"))
    await js.publish(node.input, request.SerializeToString())

    [output] = await downstream.wait_for(1, timeout=20)
    assert text_of(output.payload) == "hello late"
    assert (await readyz(sidecar))[0] == 200
    assert len(errors_of(caplog)) == 1
