"""The sidecar's channel against a fake in-process handler host over a Unix socket."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import grpc
import pytest
from google.protobuf import any_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos import runner_pb2
from protos.kre_nats_msg_pb2 import KreNatsMessage
from sidecar import channel as channel_module
from sidecar.channel import HandlerChannel
from sidecar.errors import HandlerUnavailable
from tests.unit.fake_handler_host import (
    CheckOnlyHealth,
    Emit,
    FakeHandlerHost,
    Respond,
    RunningHost,
    greet,
    packed,
    text_of,
)


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition until it holds, failing after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


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


StartHost = Callable[..., Awaitable[RunningHost]]


@pytest.fixture(params=[True, False], ids=["ProcessBatch", "Process"])
def started(request: pytest.FixtureRequest) -> StartHost:
    """Start a fake host: one with ProcessBatch, and one from before it."""

    async def start(address: str, respond: Respond = greet, serving: bool = True) -> RunningHost:
        host = FakeHandlerHost(respond, batched=request.param)
        return await RunningHost(address, host).start(serving)

    return start


@pytest.fixture
async def channel(address: str) -> AsyncIterator[HandlerChannel]:
    chan = HandlerChannel(address, max_message_bytes=4 * 1024 * 1024)
    await chan.start()
    yield chan
    await chan.close()


async def test_a_call_returns_the_result(
    started: StartHost, address: str, channel: HandlerChannel
) -> None:
    host = await started(address)
    try:
        await asyncio.wait_for(channel.wait_ready(), 5)
        result = await channel.call(delivery("ana"), no_early_reply)
        assert text_of(result.payload) == "hello ana"
        assert channel.in_flight == 0
    finally:
        await host.stop()


async def test_interleaved_events_are_routed_by_delivery_id(
    started: StartHost, address: str, channel: HandlerChannel
) -> None:
    async def slower_first(d: runner_pb2.Delivery, emit: Emit) -> None:
        n = int(text_of(d.message.payload))
        await emit(early_reply=packed(f"early {n}"))
        await asyncio.sleep(0.002 * (30 - n))  # later deliveries answer first
        await emit(result=runner_pb2.Result(payload=packed(f"result {n}")))

    host = await started(address, slower_first)
    try:
        await asyncio.wait_for(channel.wait_ready(), 5)
        early: dict[int, list[str]] = {n: [] for n in range(30)}

        async def one(n: int) -> str:
            async def on_early(payload: any_pb2.Any) -> None:
                early[n].append(text_of(payload))

            result = await channel.call(delivery(str(n)), on_early)
            return text_of(result.payload)

        results = await asyncio.gather(*(one(n) for n in range(30)))
        assert results == [f"result {n}" for n in range(30)]
        assert early == {n: [f"early {n}"] for n in range(30)}
        assert host.host.streams == 1  # one long-lived stream carried them all
        assert len({d.id for d in host.host.deliveries}) == 30
    finally:
        await host.stop()


async def test_early_replies_come_in_order_before_the_result(
    started: StartHost, address: str, channel: HandlerChannel
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
    started: StartHost, address: str, channel: HandlerChannel
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


async def test_not_ready_until_the_host_reports_serving(
    started: StartHost, address: str, channel: HandlerChannel
) -> None:
    host = await started(address, serving=False)
    try:
        await eventually(lambda: channel.status != "waiting for the handler host")
        assert not channel.serving and not channel.ready
        await host.set_serving(True)
        await asyncio.wait_for(channel.wait_ready(), 5)
        assert channel.serving
        await host.set_serving(False)
        await eventually(lambda: not channel.serving)
        assert not channel.ready
    finally:
        await host.stop()


async def test_not_serving_keeps_the_open_stream_for_in_flight_calls(
    started: StartHost, address: str, channel: HandlerChannel
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


async def test_close_fails_pending_calls(started: StartHost, address: str) -> None:
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
        with pytest.raises(HandlerUnavailable):
            await asyncio.wait_for(call, 5)
    finally:
        await host.stop()


async def test_tcp_address_works_too(
    started: StartHost,
) -> None:
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


async def test_a_host_that_sends_no_result_in_time_counts_as_unreachable(
    started: StartHost, address: str
) -> None:
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


async def test_an_older_host_without_process_batch_gets_process(
    address: str, channel: HandlerChannel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.channel")
    fake = FakeHandlerHost(batched=False)
    host = await RunningHost(address, fake).start()
    try:
        await asyncio.wait_for(channel.wait_ready(), 5)
        results = await asyncio.gather(
            *(channel.call(delivery(f"n{i}"), no_early_reply) for i in range(5))
        )
    finally:
        await host.stop()

    assert [text_of(r.payload) for r in results] == [f"hello n{i}" for i in range(5)]
    assert fake.streams == 1  # the Process stream: ProcessBatch was refused, no retries
    assert "has no ProcessBatch" in caplog.text


async def test_queued_deliveries_go_out_as_one_batch_under_the_byte_cap() -> None:
    requests: asyncio.Queue[channel_module._Request | None] = asyncio.Queue()
    small = [delivery(f"s{i}") for i in range(3)]
    big = runner_pb2.Delivery(id=9, subject="x" * (channel_module.BATCH_BYTES - 100))
    for i, item in enumerate(small, start=1):
        item.id = i
    for item in (*small, big, small[0]):
        data = item.SerializeToString()
        requests.put_nowait(channel_module._Request(len(data), (data,)))
    requests.put_nowait(None)

    batches = [
        runner_pb2.DeliveryBatch.FromString(data)
        async for data in channel_module._batches(requests)
    ]

    # The three small ones together; the big one would pass the cap: it goes alone,
    # with what fits behind it; then the end of the queue ends the stream.
    assert [[d.id for d in b.deliveries] for b in batches] == [[1, 2, 3], [9, 1]]
    assert batches[0].deliveries[2] == small[2]


async def test_an_envelope_given_as_bytes_arrives_as_the_delivery_message(
    started: StartHost, address: str, channel: HandlerChannel
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


async def test_batches_stay_under_the_grpc_message_limit(started: StartHost, address: str) -> None:
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


async def test_a_batch_counts_the_framing_of_each_delivery() -> None:
    requests: asyncio.Queue[channel_module._Request | None] = asyncio.Queue()
    for n in range(10):
        data = runner_pb2.Delivery(id=n + 1, subject="s" * 200).SerializeToString()
        requests.put_nowait(channel_module._Request(len(data), (data,)))
    requests.put_nowait(None)
    cap = 1000

    sizes = [len(data) async for data in channel_module._batches(requests, cap)]

    assert sum(sizes) > cap and all(size <= cap for size in sizes), sizes


async def test_a_host_without_health_watch_is_polled_with_check(address: str) -> None:
    host = await RunningHost(address, FakeHandlerHost(), CheckOnlyHealth()).start()
    chan = HandlerChannel(address)
    await chan.start()
    try:
        await asyncio.wait_for(chan.wait_ready(), 5)
        assert text_of((await chan.call(delivery("polled"), no_early_reply)).payload) == (
            "hello polled"
        )
        await host.set_serving(False)  # seen at the next Check, a second later
        await eventually(lambda: not chan.serving, timeout=5)
        assert chan.status == "NOT_SERVING"
    finally:
        await chan.close()
        await host.stop()


async def test_the_health_messages_live_beside_grpc_health() -> None:
    # The sidecar's own copies of grpc.health.v1's messages share no descriptor pool with
    # grpcio's (both are loaded here): the same bytes on the wire, no clash of names.
    from grpc_health.v1 import health_pb2

    ours = channel_module.HealthCheckRequest(service="kre.runner.v1.HandlerHost")
    theirs = health_pb2.HealthCheckRequest.FromString(ours.SerializeToString())
    assert theirs.service == "kre.runner.v1.HandlerHost"
    wire = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
    assert channel_module.HealthCheckResponse.FromString(wire.SerializeToString()).status == 2


@pytest.mark.parametrize("size", [0, 1, 10, 11, 100_000])
def test_a_data_frame_shows_as_hyperframe_shows_it(size: int) -> None:
    # h2 formats each frame it receives, logging or not; the sidecar's DATA frame repr
    # reads 11 bytes instead of hex-encoding the whole body, and says the same.
    import hyperframe.frame

    assert hyperframe.frame.DataFrame._body_repr is channel_module._data_frame_body_repr
    frame = hyperframe.frame.DataFrame(
        1, data=bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    )
    assert frame._body_repr() == hyperframe.frame._raw_data_repr(frame.serialize_body())


def test_a_data_frame_repr_reads_no_more_than_its_head(monkeypatch: pytest.MonkeyPatch) -> None:
    import hyperframe.frame

    def whole_body(frame: object) -> bytes:
        raise AssertionError("the whole body was serialized for a repr")

    monkeypatch.setattr(hyperframe.frame.DataFrame, "serialize_body", whole_body)
    frame = hyperframe.frame.DataFrame(1, data=b"\x01" * 65536)
    assert repr(frame).endswith("<hex:01010101010101010101...>")


async def test_the_host_ending_the_stream_fails_pending_calls_and_is_said(
    started: StartHost, address: str, caplog: pytest.LogCaptureFixture
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
            host.host.end_streams()  # OK trailers (grpcio then resets the stream)
            with pytest.raises(HandlerUnavailable) as info:
                await asyncio.wait_for(call, 5)
        assert info.value.reason == "the handler host ended the stream"
        assert "stream to the handler host closed: the handler host ended the stream" in (
            caplog.text
        )
        await eventually(lambda: host.host.streams == 2)  # and a new one is opened
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


async def close_as_the_connection_drops(chan: HandlerChannel) -> None:
    """The connection is lost, and close() runs in the same loop iteration; it must end."""
    await asyncio.sleep(0.2)  # both tasks parked inside their streams
    tasks = list(chan._tasks)
    chan._channel._protocol.processor.close("Connection lost")  # type: ignore[union-attr]
    async with asyncio.timeout(5):  # close() runs now, in this iteration (no new task)
        await chan.close()
    assert all(task.done() for task in tasks)


async def test_close_ends_even_when_the_connection_drops_at_that_moment(
    started: StartHost, address: str
) -> None:
    # grpclib turns the cancel of a task waiting on a stream into StreamTerminatedError
    # when the connection is lost in the same loop iteration: the loops must still end.
    host = await started(address)
    chan = HandlerChannel(address)
    await chan.start()
    try:
        await asyncio.wait_for(chan.wait_ready(), 5)
        await close_as_the_connection_drops(chan)
        assert not chan.serving
    finally:
        await host.stop()


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
    # The sidecar runs on uvloop, which cannot dial an abstract socket by its path.
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


async def test_close_ends_even_when_the_connection_drops_while_a_stream_opens(
    address: str,
) -> None:
    # The stream task waits for the host's headers when the connection drops and close()
    # cancels it in the same iteration: the stream loop must end too, not open another.
    fake = FakeHandlerHost()
    fake.headers_held = asyncio.Event()  # never set: the stream never opens
    host = await RunningHost(address, fake).start()
    chan = HandlerChannel(address)
    await chan.start()
    try:
        await eventually(lambda: chan.serving and fake.batch_streams_asked == 1)
        await close_as_the_connection_drops(chan)
        assert fake.batch_streams_asked == 1
    finally:
        await host.stop(0)
