"""The sidecar in-process against a real nats-server and a fake in-process handler host.

No user code and no handler_host package: the host is the tiny gRPC servicer in
tests/unit/fake_handler_host.py, so every ending of the outcome table can be forced.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from google.protobuf.wrappers_pb2 import StringValue
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo

from deploy.local.client import Downstream, Upstream, ensure_stream, request_envelope
from protos import runner_pb2
from protos.kre_nats_msg_pb2 import KreNatsMessage
from sidecar.main import Sidecar
from sidecar.settings import SidecarSettings, default_dlq_subject
from tests.unit.fake_handler_host import Emit, FakeHandlerHost, RunningHost, packed, text_of
from tests.waiting import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

NODE = "node-x"
# KRE's tracking times: naive UTC, six fraction digits.
KRE_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}")


def words(envelope: KreNatsMessage) -> str:
    return text_of(envelope.payload)


class Node:
    """The subjects of one test's node, its fake host and its sidecars."""

    def __init__(self, nats_url: str, stream: str, folder: str) -> None:
        self.stream = stream
        self.address = f"unix://{folder}/handler.sock"
        self.input = f"{stream}.in"
        self.output = f"{stream}.out"
        self.entrypoint = f"{stream}.entry"
        # Outputs `<stream>.<token>` have KRE's shape: dead letters go to `<stream>.<node>-dlq`.
        self.dlq = default_dlq_subject(self.output, stream, NODE)
        self.env = {
            "KRT_NODE_NAME": NODE,
            "KRT_NATS_SERVER": nats_url,
            "KRT_NATS_INPUT": self.input,
            "KRT_NATS_OUTPUT": self.output,
            "KRT_NATS_STREAM": stream,
            "KRT_NATS_ENTRYPOINT_SUBJECT": self.entrypoint,
            "KRT_HANDLER_ADDRESS": self.address,
            "KRT_HTTP_HOST": "127.0.0.1",
            "KRT_HTTP_PORT": "0",
            "KRT_NAK_DELAY": "0.05",
            "KRT_SHUTDOWN_GRACE": "5",
        }
        self.hosts: list[RunningHost] = []
        self.sidecars: list[Sidecar] = []

    async def host(self, respond: Callable[..., Awaitable[None]] | None = None) -> FakeHandlerHost:
        fake = FakeHandlerHost(respond) if respond else FakeHandlerHost()
        self.hosts.append(await RunningHost(self.address, fake).start())
        return fake

    async def sidecar(self, **env: str) -> Sidecar:
        sidecar = Sidecar(SidecarSettings.from_env({**self.env, **env}))
        self.sidecars.append(sidecar)
        await sidecar.start()
        return sidecar

    async def close(self) -> None:
        for sidecar in self.sidecars:
            await sidecar.stop()
        for host in self.hosts:
            await host.stop()


@pytest.fixture
def folder() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="kre-sc-")  # short: Unix socket paths are limited
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def node(nats_server, js, stream_name: str, folder: str) -> AsyncIterator[Node]:  # type: ignore[no-untyped-def]
    n = Node(nats_server.url, stream_name, folder)
    await ensure_stream(js, stream_name, [n.input, n.output, n.entrypoint, n.dlq])
    yield n
    await n.close()
    await js.delete_stream(stream_name)


async def settled(js: JetStreamContext, node: Node) -> ConsumerInfo:
    """Wait until the node's consumer has nothing pending and nothing waiting for an ack."""
    info: ConsumerInfo | None = None

    async def check() -> bool:
        nonlocal info
        info = await js.consumer_info(node.stream, NODE)
        return info.num_pending == 0 and info.num_ack_pending == 0

    await eventually(check)
    assert info is not None
    return info


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_200_messages_give_200_outputs_and_a_settled_consumer(
    js: JetStreamContext, node: Node
) -> None:
    await node.host()
    await node.sidecar(KRT_MAX_IN_FLIGHT="16")
    downstream = await Downstream(js, node.stream, node.output).start()
    requests = [request_envelope(StringValue(value=f"w{i}")) for i in range(200)]

    await Upstream(js, node.input).send_all(requests)
    outputs = await downstream.wait_for(200, timeout=30)

    assert len(outputs) == 200 and downstream.duplicates() == 0
    by_id = downstream.by_tracking_id()
    for i, request in enumerate(requests):
        output = by_id[request.tracking_id]
        assert words(output) == f"hello w{i}"
        assert output.reply == request.reply
        assert [t.node_name for t in output.tracking] == ["entrypoint", NODE]
        assert KRE_TIME.fullmatch(output.tracking[1].end)
    info = await settled(js, node)
    assert info.num_redelivered == 0
    # KRT_MAX_DELIVER is counted by the sidecar: JetStream's own limit would drop messages.
    assert info.config.max_deliver == -1 and info.config.ack_wait == 30


async def test_raise_none_and_bad_input(js: JetStreamContext, node: Node) -> None:
    async def respond(d: runner_pb2.Delivery, emit: Emit) -> None:
        text = text_of(d.message.payload)
        if text == "raise":
            failure = runner_pb2.Failure(message="boom", type="ValueError")
            await emit(result=runner_pb2.Result(failure=failure))
        else:
            await emit(result=runner_pb2.Result())  # returned None

    await node.host(respond)
    await node.sidecar()
    downstream = await Downstream(js, node.stream, node.output, node.entrypoint).start()
    raising = request_envelope(StringValue(value="raise"))
    quiet = request_envelope(StringValue(value="none"))

    await js.publish(node.input, raising.SerializeToString())
    await js.publish(node.input, quiet.SerializeToString())
    await js.publish(node.input, b"not a protobuf")
    await js.publish(node.input, b"\x1f\x8bnot gzip")
    outputs = await downstream.wait_for(3, timeout=20)
    info = await settled(js, node)

    errors = sorted(m.error for m in outputs)
    assert len(outputs) == 3, errors
    assert f"error in '{NODE}': boom" in errors
    assert sum(e.startswith(f"error in '{NODE}': bad input: ") for e in errors) == 2
    by_id = downstream.by_tracking_id()
    assert by_id[raising.tracking_id].error == f"error in '{NODE}': boom"
    # Every error went to the entrypoint, none downstream: the workflow stops there.
    assert [m for m in outputs if downstream.subject_of[m.tracking_id] != node.entrypoint] == []
    assert quiet.tracking_id not in by_id
    assert info.num_redelivered == 0


async def test_early_reply_goes_to_the_entrypoint_and_marks_the_output(
    js: JetStreamContext, node: Node
) -> None:
    async def respond(d: runner_pb2.Delivery, emit: Emit) -> None:
        await emit(early_reply=packed("early"))
        await emit(result=runner_pb2.Result(payload=packed("late")))

    await node.host(respond)
    await node.sidecar()
    entry = await Downstream(js, node.stream, node.entrypoint).start()
    downstream = await Downstream(js, node.stream, node.output).start()
    request = request_envelope(StringValue(value="x"))

    await js.publish(node.input, request.SerializeToString())
    [early] = await entry.wait_for(1, timeout=20)
    [output] = await downstream.wait_for(1, timeout=20)

    assert words(early) == "early" and early.replied and early.tracking_id == request.tracking_id
    assert words(output) == "late" and output.replied
    await settled(js, node)


async def test_retryable_failure_is_retried_then_succeeds(js: JetStreamContext, node: Node) -> None:
    async def respond(d: runner_pb2.Delivery, emit: Emit) -> None:
        if d.attempt < 3:
            failure = runner_pb2.Failure(message="busy", type="RetryableError", retryable=True)
            await emit(result=runner_pb2.Result(failure=failure))
        else:
            await emit(result=runner_pb2.Result(payload=packed(f"done on {d.attempt}")))

    host = await node.host(respond)
    await node.sidecar()
    downstream = await Downstream(js, node.stream, node.output).start()

    await js.publish(node.input, request_envelope(StringValue(value="x")).SerializeToString())
    [output] = await downstream.wait_for(1, timeout=20)

    assert words(output) == "done on 3"
    assert [d.attempt for d in host.deliveries] == [1, 2, 3]
    assert {d.stream_sequence for d in host.deliveries} == {1}
    await settled(js, node)


async def test_retryable_failure_dead_letters_at_max_deliver(
    js: JetStreamContext, node: Node
) -> None:
    async def respond(d: runner_pb2.Delivery, emit: Emit) -> None:
        failure = runner_pb2.Failure(message="busy", type="RetryableError", retryable=True)
        await emit(result=runner_pb2.Result(failure=failure))

    host = await node.host(respond)
    await node.sidecar(KRT_MAX_DELIVER="3")
    downstream = await Downstream(js, node.stream, node.entrypoint).start()
    request = request_envelope(StringValue(value="x"))

    await js.publish(node.input, request.SerializeToString())
    [error] = await downstream.wait_for(1, timeout=20)

    assert error.tracking_id == request.tracking_id
    assert error.error.startswith(f"error in '{NODE}': gave up after 3 attempts")
    assert [d.attempt for d in host.deliveries] == [1, 2, 3]
    await settled(js, node)


async def test_host_going_away_loses_nothing(js: JetStreamContext, node: Node) -> None:
    async def hang(d: runner_pb2.Delivery, emit: Emit) -> None:
        await asyncio.Event().wait()

    hanging = await node.host(hang)
    sidecar = await node.sidecar()
    downstream = await Downstream(js, node.stream, node.output).start()
    await Upstream(js, node.input).send_all(
        [request_envelope(StringValue(value=f"m{i}")) for i in range(10)]
    )
    await eventually(lambda: len(hanging.deliveries) == 10)

    await node.hosts.pop().stop()  # the handler host dies with 10 messages inside
    await eventually(lambda: not sidecar.ready()[0])
    await node.host()  # ...and comes back

    outputs = await downstream.wait_for(10, timeout=30)
    assert sorted(words(m) for m in outputs) == sorted(f"hello m{i}" for i in range(10))
    assert downstream.duplicates() == 0
    await settled(js, node)


async def test_in_progress_acks_keep_a_slow_handler_from_redelivery(
    js: JetStreamContext, node: Node
) -> None:
    async def slow(d: runner_pb2.Delivery, emit: Emit) -> None:
        await asyncio.sleep(2.5)
        await emit(result=runner_pb2.Result(payload=packed("slow")))

    host = await node.host(slow)
    await node.sidecar(KRT_ACK_WAIT="1")
    downstream = await Downstream(js, node.stream, node.output).start()

    await js.publish(node.input, request_envelope(StringValue(value="x")).SerializeToString())
    [output] = await downstream.wait_for(1, timeout=20)

    assert words(output) == "slow"
    assert len(host.deliveries) == 1
    info = await settled(js, node)
    assert info.num_redelivered == 0


async def test_in_progress_acks_keep_every_slow_message_in_flight(
    js: JetStreamContext, node: Node
) -> None:
    async def slow(d: runner_pb2.Delivery, emit: Emit) -> None:
        await asyncio.sleep(2.5)
        await emit(result=runner_pb2.Result(payload=packed(f"slow {text_of(d.message.payload)}")))

    host = await node.host(slow)
    await node.sidecar(KRT_ACK_WAIT="1")
    downstream = await Downstream(js, node.stream, node.output).start()

    await Upstream(js, node.input).send_all(
        [request_envelope(StringValue(value=f"m{i}")) for i in range(5)]
    )
    outputs = await downstream.wait_for(5, timeout=20)

    assert sorted(words(m) for m in outputs) == [f"slow m{i}" for i in range(5)]
    assert len(host.deliveries) == 5  # one keep-alive task covered all five at once
    info = await settled(js, node)
    assert info.num_redelivered == 0


async def test_the_byte_budget_bounds_the_messages_in_flight(
    js: JetStreamContext, node: Node
) -> None:
    running, most = 0, 0

    async def held(d: runner_pb2.Delivery, emit: Emit) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.3)
        running -= 1
        await emit(result=runner_pb2.Result(payload=packed(str(len(text_of(d.message.payload))))))

    await node.host(held)
    downstream = await Downstream(js, node.stream, node.output).start()
    # Eight of about 100 KB, then one of 600 KB, more than the whole budget: it must pass.
    sizes = [100_000] * 8 + [600_000]
    await Upstream(js, node.input).send_all(
        [request_envelope(StringValue(value="x" * size)) for size in sizes]
    )
    await node.sidecar(KRT_MAX_IN_FLIGHT_BYTES="250000", KRT_MAX_IN_FLIGHT="64")

    outputs = await downstream.wait_for(9, timeout=30)

    assert sorted(int(words(m)) for m in outputs) == sorted(sizes)
    # Taken while under 250,000 bytes, one at a time (the server's max_payload is 1 MiB):
    # a third 100 KB message puts the window over, and nothing more comes until one ends.
    assert 2 <= most <= 3
    await settled(js, node)


async def test_missing_stream_means_not_ready_until_it_exists(
    js: JetStreamContext, node: Node
) -> None:
    await node.host()
    # The dead letters stay in the first stream: only the late stream is missing. The
    # input is the late stream's, as a consumer reads only its own stream.
    sidecar = await node.sidecar(
        KRT_NATS_STREAM=f"{node.stream}-late",
        KRT_NATS_INPUT=f"{node.stream}-late.in",
        KRT_NATS_DLQ_SUBJECT=node.dlq,
    )
    await eventually(lambda: "not found" in sidecar.ready()[1])
    status, body = await http_get(sidecar.http_port, "/readyz")
    assert status == 503 and "not found" in body
    assert (await http_get(sidecar.http_port, "/healthz"))[0] == 200

    await js.add_stream(name=f"{node.stream}-late", subjects=[f"{node.stream}-late.>"])
    try:
        await eventually(lambda: sidecar.ready()[0])
        assert (await http_get(sidecar.http_port, "/readyz")) == (200, "ready\n")
    finally:
        await sidecar.stop()
        await js.delete_stream(f"{node.stream}-late")


async def test_metrics_and_probes(js: JetStreamContext, node: Node) -> None:
    sidecar = await node.sidecar()
    status, body = await http_get(sidecar.http_port, "/readyz")
    assert status == 503 and "handler host not serving" in body

    await node.host()
    await eventually(lambda: sidecar.ready()[0])
    await js.publish(node.input, request_envelope(StringValue(value="x")).SerializeToString())
    await settled(js, node)

    status, body = await http_get(sidecar.http_port, "/metrics")
    assert status == 200
    assert 'kre_sidecar_messages_total{outcome="published"}' in body
    assert "kre_sidecar_handler_seconds_bucket" in body
    assert "kre_sidecar_publish_seconds_bucket" in body
    assert 'kre_sidecar_bytes_total{direction="in"}' in body
    assert 'kre_sidecar_bytes_total{direction="out"}' in body
    assert "kre_sidecar_redeliveries_total" in body
    assert (await http_get(sidecar.http_port, "/nope"))[0] == 404


async def test_shutdown_naks_what_is_unfinished_and_another_replica_takes_it(
    js: JetStreamContext, node: Node
) -> None:
    async def hang(d: runner_pb2.Delivery, emit: Emit) -> None:
        await asyncio.Event().wait()

    hanging = await node.host(hang)
    first = await node.sidecar(KRT_SHUTDOWN_GRACE="0.2")
    await js.publish(node.input, request_envelope(StringValue(value="x")).SerializeToString())
    await eventually(lambda: len(hanging.deliveries) == 1)

    started = time.monotonic()
    await first.stop()
    assert time.monotonic() - started < 5
    await node.hosts.pop().stop()

    await node.host()
    downstream = await Downstream(js, node.stream, node.output).start()
    await node.sidecar()
    [output] = await downstream.wait_for(1, timeout=20)
    assert words(output) == "hello x"
    await settled(js, node)


async def test_several_input_subjects(js: JetStreamContext, node: Node) -> None:
    await node.host()
    other = f"{node.stream}.in2"
    await ensure_stream(js, node.stream, [other])
    await node.sidecar(KRT_NATS_INPUT="", KRT_NATS_INPUTS=f"{node.input},{other}")
    downstream = await Downstream(js, node.stream, node.output).start()

    await js.publish(node.input, request_envelope(StringValue(value="one")).SerializeToString())
    await js.publish(other, request_envelope(StringValue(value="two")).SerializeToString())
    outputs = await downstream.wait_for(2, timeout=20)

    assert sorted(words(m) for m in outputs) == ["hello one", "hello two"]
    info = await settled(js, node)
    assert sorted(info.config.filter_subjects or []) == sorted([node.input, other])


async def test_a_consumer_deleted_while_running_is_created_again(
    js: JetStreamContext, node: Node
) -> None:
    await node.host()
    sidecar = await node.sidecar()
    downstream = await Downstream(js, node.stream, node.output).start()
    await eventually(lambda: sidecar.consumer is not None and sidecar.consumer.bound)

    await js.delete_consumer(node.stream, NODE)
    request = request_envelope(StringValue(value="after"))
    await Upstream(js, node.input).send_all([request])

    outputs = await downstream.wait_for(1, timeout=30)
    assert [words(o) for o in outputs] == ["hello after"]
    await settled(js, node)
