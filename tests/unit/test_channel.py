"""The sidecar's channel against a fake in-process handler host over a Unix socket."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from google.protobuf import any_pb2, wrappers_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos import runner_pb2
from protos.kre_nats_msg_pb2 import KreNatsMessage
from sidecar import framing
from sidecar.channel import HandlerChannel
from sidecar.errors import HandlerUnavailable
from tests.unit.fake_handler_host import (
    Emit,
    FakeHandlerHost,
    Respond,
    RunningHost,
    greet,
    packed,
    text_of,
)
from tests.waiting import eventually


def delivery(text: str) -> runner_pb2.Delivery:
    return runner_pb2.Delivery(
        message=KreNatsMessage(tracking_id=text, payload=packed(text)),
        subject="in",
        stream_sequence=1,
        attempt=1,
    )


async def no_early_reply(payload: any_pb2.Any) -> None:
    raise AssertionError("unexpected early reply")


@pytest.fixture
def address() -> Iterator[str]:
    folder = tempfile.mkdtemp(prefix="kre-ch-")  # short: socket paths are limited to 107 bytes
    yield f"unix://{folder}/handler.sock"
    shutil.rmtree(folder, ignore_errors=True)


async def started(address: str, respond: Respond = greet, serving: bool = True) -> RunningHost:
    return await RunningHost(address, FakeHandlerHost(respond)).start(serving)


@pytest.fixture
async def channel(address: str) -> AsyncIterator[HandlerChannel]:
    chan = HandlerChannel(address, max_message_bytes=4 * 1024 * 1024)
    await chan.start()
    yield chan
    await chan.close()


async def test_a_call_returns_the_result(address: str, channel: HandlerChannel) -> None:
    host = await started(address)
    try:
        await asyncio.wait_for(channel.wait_ready(), 5)
        result = await channel.call(delivery("ana"), no_early_reply)
        assert text_of(result.payload) == "hello ana"
        assert channel.in_flight == 0
    finally:
        await host.stop()


async def test_interleaved_events_are_routed_by_delivery_id(
    address: str, channel: HandlerChannel
) -> None:
    # Each delivery answers only once every later one has: the Results come back in the
    # reverse order of the calls, after all the early replies.
    answered = [asyncio.Event() for _ in range(31)]
    answered[30].set()

    async def last_first(d: runner_pb2.Delivery, emit: Emit) -> None:
        n = int(text_of(d.message.payload))
        await emit(early_reply=packed(f"early {n}"))
        await answered[n + 1].wait()
        await emit(result=runner_pb2.Result(payload=packed(f"result {n}")))
        answered[n].set()

    host = await started(address, last_first)
    try:
        await asyncio.wait_for(channel.wait_ready(), 5)
        early: dict[int, list[str]] = {n: [] for n in range(30)}

        async def one(n: int) -> str:
            async def on_early(payload: any_pb2.Any) -> None:
                early[n].append(text_of(payload))

            result = await channel.call(delivery(str(n)), on_early)
            return text_of(result.payload)

        results = await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(30))), 10)
        assert results == [f"result {n}" for n in range(30)]
        assert early == {n: [f"early {n}"] for n in range(30)}
        assert host.host.streams == 1  # one long-lived stream carried them all
        assert len({d.id for d in host.host.deliveries}) == 30
    finally:
        await host.stop()


async def test_early_replies_come_in_order_before_the_result(
    address: str, channel: HandlerChannel
) -> None:
    async def three_early(d: runner_pb2.Delivery, emit: Emit) -> None:
        for i in range(3):
            await emit(early_reply=packed(f"early {i}"))
        await emit(result=runner_pb2.Result())

    host = await started(address, three_early)
    try:
        await asyncio.wait_for(channel.wait_ready(), 5)
        seen: list[str] = []

        async def on_early(payload: any_pb2.Any) -> None:
            await asyncio.sleep(0.01)  # a slow publish must not reorder or drop anything
            seen.append(text_of(payload))

        result = await channel.call(delivery("x"), on_early)
        assert seen == ["early 0", "early 1", "early 2"]
        assert result.WhichOneof("outcome") is None
    finally:
        await host.stop()


async def test_host_going_away_fails_pending_calls_then_recovers(
    address: str, channel: HandlerChannel
) -> None:
    async def hang(d: runner_pb2.Delivery, emit: Emit) -> None:
        await asyncio.Event().wait()

    host = await started(address, hang)
    await asyncio.wait_for(channel.wait_ready(), 5)
    calls = [asyncio.create_task(channel.call(delivery(str(n)), no_early_reply)) for n in range(5)]
    await eventually(lambda: len(host.host.deliveries) == 5)

    await host.stop()

    outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
    assert all(isinstance(o, HandlerUnavailable) for o in outcomes), outcomes
    await eventually(lambda: not channel.ready)
    with pytest.raises(HandlerUnavailable):
        await channel.call(delivery("late"), no_early_reply)

    again = await started(address)
    try:
        await asyncio.wait_for(channel.wait_ready(), 10)
        result = await channel.call(delivery("back"), no_early_reply)
        assert text_of(result.payload) == "hello back"
    finally:
        await again.stop()


async def test_no_host_says_why_in_the_status(channel: HandlerChannel) -> None:
    await eventually(lambda: channel.status != "waiting for the handler host")
    assert channel.status.startswith("UNAVAILABLE: ")
    assert not channel.serving and not channel.ready


async def test_not_ready_until_the_host_reports_serving(
    address: str, channel: HandlerChannel
) -> None:
    host = await started(address, serving=False)
    try:
        await eventually(lambda: channel.status == "NOT_SERVING")
        assert not channel.serving and not channel.ready
        await host.set_serving(True)
        await asyncio.wait_for(channel.wait_ready(), 5)
        assert channel.serving and channel.status == "serving"
        await host.set_serving(False)
        await eventually(lambda: not channel.serving)
        assert not channel.ready and channel.status == "NOT_SERVING"
    finally:
        await host.stop()


async def test_not_serving_keeps_the_open_stream_for_in_flight_calls(
    address: str, channel: HandlerChannel
) -> None:
    release = asyncio.Event()

    async def wait_for_release(d: runner_pb2.Delivery, emit: Emit) -> None:
        await release.wait()
        await emit(result=runner_pb2.Result(payload=packed("done")))

    host = await started(address, wait_for_release)
    try:
        await asyncio.wait_for(channel.wait_ready(), 5)
        call = asyncio.create_task(channel.call(delivery("x"), no_early_reply))
        await eventually(lambda: len(host.host.deliveries) == 1)
        await host.set_serving(False)  # the host starts shutting down...
        await eventually(lambda: not channel.serving)
        release.set()  # ...but still finishes what it has
        result = await asyncio.wait_for(call, 5)
        assert text_of(result.payload) == "done"
    finally:
        await host.stop()


async def test_a_refused_stream_is_said_and_asked_again(
    address: str, channel: HandlerChannel, caplog: pytest.LogCaptureFixture
) -> None:
    host = await started(address)
    host.host.refuse_streams(grpc.StatusCode.UNAVAILABLE, "host says: shutting down")
    try:
        with caplog.at_level(logging.WARNING, logger="sidecar.channel"):
            await eventually(lambda: host.host.batch_streams_asked >= 2)
        assert channel.serving and not channel.ready
        assert channel.status == "handler stream not open"
        assert (
            "ProcessBatch stream to the handler host closed: UNAVAILABLE: host says: "
            "shutting down" in caplog.text
        )
        host.host.refuse_streams(None)
        await asyncio.wait_for(channel.wait_ready(), 5)
        assert text_of((await channel.call(delivery("in"), no_early_reply)).payload) == "hello in"
    finally:
        await host.stop()


async def test_close_fails_pending_calls(address: str) -> None:
    async def hang(d: runner_pb2.Delivery, emit: Emit) -> None:
        await asyncio.Event().wait()

    host = await started(address, hang)
    chan = HandlerChannel(address)
    await chan.start()
    try:
        await asyncio.wait_for(chan.wait_ready(), 5)
        call = asyncio.create_task(chan.call(delivery("x"), no_early_reply))
        await eventually(lambda: len(host.host.deliveries) == 1)
        await chan.close()
        with pytest.raises(HandlerUnavailable, match="the channel is closed"):
            await asyncio.wait_for(call, 5)
        assert not chan.serving and not chan.ready and chan.status == "channel closed"
    finally:
        await host.stop()


async def test_tcp_address_works_too() -> None:
    host = await started("127.0.0.1:0")
    chan = HandlerChannel(host.target)
    await chan.start()
    try:
        await asyncio.wait_for(chan.wait_ready(), 5)
        result = await chan.call(delivery("tcp"), no_early_reply)
        assert text_of(result.payload) == "hello tcp"
    finally:
        await chan.close()
        await host.stop()


async def test_a_host_that_sends_no_result_in_time_counts_as_unreachable(address: str) -> None:
    async def never(d: runner_pb2.Delivery, emit: Emit) -> None:
        await asyncio.Event().wait()

    host = await started(address, never)
    chan = HandlerChannel(address, result_timeout=0.3)
    await chan.start()
    try:
        await asyncio.wait_for(chan.wait_ready(), 5)
        with pytest.raises(
            HandlerUnavailable, match=r"no result from the handler host within 0.3s"
        ):
            await chan.call(delivery("x"), no_early_reply)
        assert chan.in_flight == 0 and chan.ready  # the stream itself stays up
    finally:
        await chan.close()
        await host.stop()


def queued(*items: runner_pb2.Delivery) -> asyncio.Queue[framing.Request | None]:
    requests: asyncio.Queue[framing.Request | None] = asyncio.Queue()
    for item in items:
        requests.put_nowait(framing.request(item))
    requests.put_nowait(None)
    return requests


async def test_queued_deliveries_go_out_as_one_batch_under_the_byte_cap() -> None:
    small = [delivery(f"s{i}") for i in range(3)]
    big = runner_pb2.Delivery(id=9, subject="x" * (framing.BATCH_BYTES - 100))
    for i, item in enumerate(small, start=1):
        item.id = i

    requests = queued(*small, big, small[0])
    batches = [
        runner_pb2.DeliveryBatch.FromString(data) async for data in framing.batches(requests)
    ]

    # The three small ones together; the big one would pass the cap: it goes alone,
    # with what fits behind it; then the end of the queue ends the stream.
    assert [[d.id for d in b.deliveries] for b in batches] == [[1, 2, 3], [9, 1]]
    assert batches[0].deliveries[2] == small[2]


async def test_a_batch_counts_the_framing_of_each_delivery() -> None:
    requests = queued(*(runner_pb2.Delivery(id=n + 1, subject="s" * 200) for n in range(10)))
    cap = 1000

    sizes = [len(data) async for data in framing.batches(requests, cap)]

    assert sum(sizes) > cap and all(size <= cap for size in sizes), sizes


def test_an_envelope_framed_as_bytes_parses_as_the_delivery_message() -> None:
    envelope = KreNatsMessage(tracking_id="t", payload=packed("x" * 300))  # a 2-byte length
    head = runner_pb2.Delivery(id=3, subject="in", stream_sequence=7)

    request = framing.request(head, envelope.SerializeToString())

    expected = runner_pb2.Delivery(id=3, subject="in", stream_sequence=7, message=envelope)
    assert runner_pb2.Delivery.FromString(b"".join(request.parts)) == expected
    assert request.size == expected.ByteSize()


def test_framing_tags_are_the_descriptors_fields() -> None:
    # A field renumbered in runner.proto changes the tags; a scalar cannot be framed so.
    fields = runner_pb2.DeliveryBatch.DESCRIPTOR.fields_by_name
    assert framing.DELIVERIES_TAG == framing.varint(fields["deliveries"].number << 3 | 2)
    with pytest.raises(TypeError, match="not a message field"):
        framing.field_tag(runner_pb2.Delivery.DESCRIPTOR.fields_by_name["id"])
    assert framing.varint(300) == b"\xac\x02"


async def test_an_envelope_given_as_bytes_arrives_as_the_delivery_message(
    address: str, channel: HandlerChannel
) -> None:
    seen: list[runner_pb2.Delivery] = []

    async def record(d: runner_pb2.Delivery, emit: Emit) -> None:
        seen.append(d)
        await greet(d, emit)

    host = await started(address, record)
    envelope = KreNatsMessage(tracking_id="t-1", payload=packed("bytes"))
    try:
        await asyncio.wait_for(channel.wait_ready(), 5)
        header = runner_pb2.Delivery(subject="in", stream_sequence=7, attempt=2)
        result = await channel.call(header, no_early_reply, message=envelope.SerializeToString())
    finally:
        await host.stop()

    assert text_of(result.payload) == "hello bytes"
    (got,) = seen
    assert got.message == envelope
    assert (got.subject, got.stream_sequence, got.attempt) == ("in", 7, 2)


async def test_batches_stay_under_the_grpc_message_limit(address: str) -> None:
    # 16 deliveries whose bytes just fit in the 1 MiB limit, but not with their framing.
    limit = 1024 * 1024
    chan = HandlerChannel(address, max_message_bytes=limit)
    await chan.start()
    host = await started(address)

    def sized(n: int) -> runner_pb2.Delivery:
        """limit / 16 bytes once the channel has set its id (2 bytes: id < 128)."""
        item = runner_pb2.Delivery(id=n + 1, subject="in", attempt=1)
        item.message.payload.CopyFrom(packed(f"{n:02d}"))
        item.message.tracking_id = "x" * (limit // 16 - item.ByteSize())
        while item.ByteSize() > limit // 16:
            item.message.tracking_id = item.message.tracking_id[: limit // 16 - item.ByteSize()]
        return item

    try:
        await asyncio.wait_for(chan.wait_ready(), 5)
        calls = [sized(n) for n in range(16)]
        assert 16 * calls[0].ByteSize() == limit  # one byte of framing each is too much
        results = await asyncio.gather(*(chan.call(d, no_early_reply) for d in calls))
    finally:
        await host.stop()
        await chan.close()

    assert [text_of(r.payload) for r in results] == [f"hello {n:02d}" for n in range(16)]


async def test_a_result_over_the_message_limit_fails_the_stream(address: str) -> None:
    # The channel's receive limit is KRT_GRPC_MAX_MESSAGE_BYTES, whatever the host sends.
    limit = 64 * 1024

    async def too_big(d: runner_pb2.Delivery, emit: Emit) -> None:
        payload = any_pb2.Any()
        payload.Pack(wrappers_pb2.BytesValue(value=b"x" * limit))
        await emit(result=runner_pb2.Result(payload=payload))

    host = await started(address, too_big)
    chan = HandlerChannel(address, max_message_bytes=limit)
    await chan.start()
    try:
        await asyncio.wait_for(chan.wait_ready(), 5)
        with pytest.raises(HandlerUnavailable) as info:
            await asyncio.wait_for(chan.call(delivery("x"), no_early_reply), 5)
        assert info.value.reason.startswith("RESOURCE_EXHAUSTED: ")
    finally:
        await chan.close()
        await host.stop()


async def test_the_host_ending_the_stream_fails_pending_calls_and_is_said(
    address: str, caplog: pytest.LogCaptureFixture
) -> None:
    never = asyncio.Event()

    async def hold(delivery: runner_pb2.Delivery, emit: Emit) -> None:
        await never.wait()

    host = await started(address, hold)
    chan = HandlerChannel(address)
    await chan.start()
    try:
        await asyncio.wait_for(chan.wait_ready(), 5)
        call = asyncio.create_task(chan.call(delivery("held"), no_early_reply))
        await eventually(lambda: len(host.host.deliveries) == 1)
        with caplog.at_level(logging.WARNING, logger="sidecar.channel"):
            host.host.end_streams()  # OK trailers
            with pytest.raises(HandlerUnavailable) as info:
                await asyncio.wait_for(call, 5)
        assert info.value.reason == "the handler host ended the stream"
        assert "stream to the handler host closed: the handler host ended the stream" in (
            caplog.text
        )
        await eventually(lambda: host.host.streams == 2 and chan.ready)  # and a new one opens
        call = asyncio.create_task(chan.call(delivery("held again"), no_early_reply))
        await eventually(lambda: len(host.host.deliveries) == 2)
        host.host.end_streams(grpc.StatusCode.UNAVAILABLE, "host says: shutting down")
        with pytest.raises(HandlerUnavailable) as info:
            await asyncio.wait_for(call, 5)
        assert info.value.reason == "UNAVAILABLE: host says: shutting down"
    finally:
        never.set()
        await chan.close()
        await host.stop()


async def close_as_the_connection_drops(chan: HandlerChannel, host: RunningHost) -> None:
    """The host goes away while close() runs; close() must end, and its tasks with it."""
    tasks = list(chan._tasks)
    stopping = asyncio.create_task(host.stop(0))
    async with asyncio.timeout(5):
        await chan.close()
        await stopping
    assert all(task.done() for task in tasks)
    assert not chan.serving and not chan.ready


async def test_close_ends_even_when_the_connection_drops_at_that_moment(address: str) -> None:
    host = await started(address)
    chan = HandlerChannel(address)
    await chan.start()
    await asyncio.wait_for(chan.wait_ready(), 5)
    await close_as_the_connection_drops(chan, host)


async def test_close_ends_even_when_the_connection_drops_while_a_stream_opens(
    address: str,
) -> None:
    # The stream task waits for the host's headers when the host goes away and close()
    # cancels it: the stream loop must end too, not open another.
    fake = FakeHandlerHost()
    fake.headers_held = asyncio.Event()  # never set: the stream never opens
    host = await RunningHost(address, fake).start()
    chan = HandlerChannel(address)
    await chan.start()
    await eventually(lambda: chan.serving and fake.batch_streams_asked == 1)
    await close_as_the_connection_drops(chan, host)
    assert fake.batch_streams_asked == 1


async def test_an_unreadable_answer_fails_the_call_and_the_stream_is_opened_again(
    address: str, caplog: pytest.LogCaptureFixture
) -> None:
    streams = 0

    async def garbage(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        nonlocal streams
        streams += 1
        await context.send_initial_metadata(())
        async for _ in requests:
            yield b"\xff\xff\xff"  # no EventBatch

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "kre.runner.v1.HandlerHost",
                {"ProcessBatch": grpc.stream_stream_rpc_method_handler(garbage)},
            )
        ]
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("kre.runner.v1.HandlerHost", health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(address)
    await server.start()
    chan = HandlerChannel(address)
    await chan.start()
    try:
        await asyncio.wait_for(chan.wait_ready(), 5)
        with caplog.at_level(logging.ERROR, logger="sidecar.channel"):
            with pytest.raises(HandlerUnavailable) as info:
                await asyncio.wait_for(chan.call(delivery("x"), no_early_reply), 5)
        assert info.value.reason.startswith("INTERNAL: DecodeError")
        assert "the stream to the handler host failed" in caplog.text
        await eventually(lambda: streams == 2 and chan.ready)
    finally:
        await chan.close()
        await server.stop(None)


@pytest.mark.parametrize("form", ["unix", "unix-abstract", "tcp"])
def test_every_address_form_works_under_uvloop(form: str, address: str) -> None:
    # The sidecar runs on uvloop; grpc dials every form itself, the abstract one included.
    uvloop = pytest.importorskip("uvloop")
    targets = {
        "unix": address,
        "unix-abstract": f"unix-abstract:kre-test-{os.getpid()}-{id(address)}",
        "tcp": "127.0.0.1:0",
    }

    async def scenario() -> str:
        host = await RunningHost(targets[form], FakeHandlerHost()).start()
        chan = HandlerChannel(host.target)
        await chan.start()
        try:
            await asyncio.wait_for(chan.wait_ready(), 5)
            return text_of((await chan.call(delivery(form), no_early_reply)).payload)
        finally:
            await chan.close()
            await host.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(scenario()) == f"hello {form}"
