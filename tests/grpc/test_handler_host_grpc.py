"""The handler host over its real gRPC server, in-process: Handle, Process and health."""

from __future__ import annotations

import asyncio
import importlib
import socket
import sys
import textwrap
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from google.protobuf import any_pb2, wrappers_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from handler_host.context import Context, pack_any
from handler_host.loader import load_user_code
from handler_host.main import start_host
from handler_host.server import HostServer, start_server
from handler_host.settings import HostSettings
from handler_host.testing import HandlerClient, serve_handler, serve_node
from protos import kre_nats_msg_pb2, runner_pb2
from protos.contract import SERVICE_NAME

ROOT = Path(__file__).resolve().parents[2]
_T = TypeVar("_T")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# One handler, many behaviours, chosen by the input text.
MULTI = """
import asyncio
from google.protobuf import wrappers_pb2
from handler_host import RetryableError

async def init(ctx):
    ctx.set("prefix", "echo:")

async def handler(ctx, data):
    text = wrappers_pb2.StringValue()
    data.Unpack(text)
    match text.value:
        case "raise":
            raise ValueError("bad input: no rows")
        case "retry":
            raise RetryableError("database busy")
        case "none":
            return None
        case "not-protobuf":
            return {"rows": 1}
        case "early":
            await ctx.early_reply(wrappers_pb2.StringValue(value="early answer"))
            return wrappers_pb2.StringValue(value="late result")
        case "early-twice":
            await ctx.early_reply(wrappers_pb2.StringValue(value="first"))
            await ctx.early_reply(wrappers_pb2.StringValue(value="second"))
        case "tracking":
            return wrappers_pb2.StringValue(value=ctx.tracking_id)
        case "exit":
            ctx.early_exit()
            return wrappers_pb2.StringValue(value="final answer")
    return wrappers_pb2.StringValue(value=ctx.get("prefix") + text.value)
"""

# Every delivery waits inside the handler until all CONCURRENT are in at once.
CONCURRENT = 200
GATED_ASYNC = f"""
import asyncio
from google.protobuf import wrappers_pb2

def init(ctx):
    ctx.set("prefix", "async:")
    ctx.set("inside", 0)

async def handler(ctx, data):
    text = wrappers_pb2.StringValue()
    data.Unpack(text)
    if ctx.get("all_inside") is None:
        ctx.set("all_inside", asyncio.Event())
    ctx.set("inside", ctx.get("inside") + 1)
    if ctx.get("inside") == {CONCURRENT}:
        ctx.get("all_inside").set()
    await asyncio.wait_for(ctx.get("all_inside").wait(), 60)
    await ctx.early_reply(wrappers_pb2.StringValue(value="early:" + text.value))
    return wrappers_pb2.StringValue(value=ctx.get("prefix") + text.value)
"""

SYNC = """
import threading
from google.protobuf import wrappers_pb2

def init(ctx):
    ctx.set("prefix", "sync:")

def handler(ctx, data):
    assert threading.current_thread() is not threading.main_thread()
    text = wrappers_pb2.StringValue()
    data.Unpack(text)
    return wrappers_pb2.StringValue(value=ctx.get("prefix") + text.value)
"""

# Blocks until the test sets the Event it put in the store as "release".
BLOCKING = """
import asyncio
from google.protobuf import wrappers_pb2

async def handler(ctx, data):
    ctx.get("entered").set()
    try:
        await ctx.get("release").wait()
    except asyncio.CancelledError:
        if ctx.get("cancelled") is not None:
            ctx.get("cancelled").set()
        raise
    return wrappers_pb2.StringValue(value="released")
"""

INIT_WAITS = """
async def init(ctx):
    await ctx.get("release_init").wait()

def handler(ctx, data):
    return None
"""


@pytest.fixture(autouse=True)
def _restore_sys_path() -> Iterator[None]:
    saved = list(sys.path)
    yield
    sys.path[:] = saved


def write_handler(folder: Path, code: str) -> str:
    (folder / "handler.py").write_text(textwrap.dedent(code))
    return str(folder)


def text(value: str) -> wrappers_pb2.StringValue:
    return wrappers_pb2.StringValue(value=value)


def unpack_text(payload: any_pb2.Any) -> str:
    value = wrappers_pb2.StringValue()
    assert payload.Unpack(value), payload.type_url
    return value.value


def deliveries(values: Iterable[str]) -> list[runner_pb2.Delivery]:
    return [
        runner_pb2.Delivery(
            id=i,
            message=kre_nats_msg_pb2.KreNatsMessage(
                tracking_id=f"t-{i}", payload=pack_any(text(v))
            ),
            subject="in",
            attempt=1,
        )
        for i, v in enumerate(values, start=1)
    ]


async def process(
    client: HandlerClient, items: list[runner_pb2.Delivery], batch: int | None = None
) -> dict[int, list[runner_pb2.Event]]:
    """Send every delivery on one stream, close our side, read until the end.

    `batch` None: a Process stream; a number: a ProcessBatch stream with that many
    deliveries per DeliveryBatch.
    """
    by_delivery: dict[int, list[runner_pb2.Event]] = defaultdict(list)
    for event in await read_events(client, items, batch):
        by_delivery[event.delivery_id].append(event)
    return by_delivery


async def read_events(
    client: HandlerClient, items: list[runner_pb2.Delivery], batch: int | None
) -> list[runner_pb2.Event]:
    if batch is None:
        return [event async for event in client.stub.Process(_aiter(items))]
    batches = [
        runner_pb2.DeliveryBatch(deliveries=items[i : i + batch])
        for i in range(0, len(items), batch)
    ]
    replies = [reply async for reply in client.stub.ProcessBatch(_aiter(batches))]
    return [event for reply in replies for event in reply.events]


async def _aiter(items: Iterable[_T]) -> AsyncIterator[_T]:
    for item in items:
        yield item


# Both stream RPCs, ProcessBatch with batches of one and of several deliveries.
STREAMS = pytest.mark.parametrize("batch", [None, 1, 7], ids=["Process", "Batch1", "Batch7"])


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return int(reply.status)


@pytest.fixture
async def multi(tmp_path: Path) -> AsyncIterator[HandlerClient]:
    async with serve_handler(write_handler(tmp_path, MULTI)) as client:
        yield client


async def test_handle_returns_the_payload_and_init_state(multi: HandlerClient) -> None:
    reply = await multi.handle(text("hello"))

    assert unpack_text(reply.result.payload) == "echo:hello"  # "echo:" was set by init
    assert not reply.early_replies
    assert reply.result.start.ToDatetime() <= reply.result.end.ToDatetime()


async def test_handle_tracking_id(multi: HandlerClient) -> None:
    reply = await multi.handle(text("tracking"), tracking_id="abc-123")
    assert unpack_text(reply.result.payload) == "abc-123"


async def test_raising_handler_gives_a_failure(multi: HandlerClient) -> None:
    failure = (await multi.handle(text("raise"))).result.failure

    assert failure.type == "ValueError"
    assert failure.message == "bad input: no rows"
    assert failure.retryable is False
    assert "raise ValueError" in failure.traceback


async def test_retryable_error_is_retryable(multi: HandlerClient) -> None:
    failure = (await multi.handle(text("retry"))).result.failure
    assert (failure.type, failure.message, failure.retryable) == (
        "RetryableError",
        "database busy",
        True,
    )


async def test_none_sets_no_outcome(multi: HandlerClient) -> None:
    result = (await multi.handle(text("none"))).result
    assert result.WhichOneof("outcome") is None
    assert result.HasField("start") and result.HasField("end")


async def test_non_protobuf_return_names_the_type(multi: HandlerClient) -> None:
    failure = (await multi.handle(text("not-protobuf"))).result.failure
    assert failure.type == "InvalidHandlerResult"
    assert "builtins.dict" in failure.message


async def test_handle_collects_early_replies(multi: HandlerClient) -> None:
    reply = await multi.handle(text("early"))

    assert [unpack_text(p) for p in reply.early_replies] == ["early answer"]
    assert unpack_text(reply.result.payload) == "late result"


async def test_early_exit_is_marked_in_the_result(multi: HandlerClient) -> None:
    exited = await multi.handle(text("exit"))
    plain = await multi.handle(text("plain"))

    assert exited.result.early_exit is True
    assert unpack_text(exited.result.payload) == "final answer"
    assert plain.result.early_exit is False


async def test_serve_node_tells_a_test_about_an_early_exit(tmp_path: Path) -> None:
    write_handler(tmp_path, MULTI)
    async with serve_node(tmp_path / "handler.py") as node:
        assert await node.call(text("exit"), wrappers_pb2.StringValue) == (
            wrappers_pb2.StringValue(value="final answer")
        )
        assert node.exited_early is True
        await node.call(text("plain"))
        assert node.exited_early is False


async def test_second_early_reply_fails(multi: HandlerClient) -> None:
    reply = await multi.handle(text("early-twice"))

    assert [unpack_text(p) for p in reply.early_replies] == ["first"]
    assert reply.result.failure.type == "EarlyReplyError"


async def test_early_reply_refused_for_an_already_replied_input(multi: HandlerClient) -> None:
    reply = await multi.handle(text("early"), replied=True)

    assert not reply.early_replies
    assert reply.result.failure.type == "EarlyReplyError"
    assert "already replied" in reply.result.failure.message


@STREAMS
async def test_process_orders_early_replies_before_results(
    multi: HandlerClient, batch: int | None
) -> None:
    values = ["early", "plain", "none", "raise", "early"]
    events = await process(multi, deliveries(values), batch)

    assert sorted(events) == [1, 2, 3, 4, 5]
    for delivery_id in (1, 5):
        first, last = events[delivery_id]
        assert unpack_text(first.early_reply) == "early answer"
        assert unpack_text(last.result.payload) == "late result"
    assert [e.WhichOneof("kind") for e in events[2]] == ["result"]
    assert unpack_text(events[2][0].result.payload) == "echo:plain"
    assert events[3][0].result.WhichOneof("outcome") is None
    assert events[4][0].result.failure.type == "ValueError"


@STREAMS
async def test_process_200_concurrent_async_deliveries(tmp_path: Path, batch: int | None) -> None:
    values = [f"m{i}" for i in range(CONCURRENT)]
    async with serve_handler(write_handler(tmp_path, GATED_ASYNC)) as client:
        events = await process(client, deliveries(values), batch)

    assert len(events) == CONCURRENT
    for delivery_id, value in enumerate(values, start=1):
        kinds = [e.WhichOneof("kind") for e in events[delivery_id]]
        assert kinds == ["early_reply", "result"], delivery_id
        early, result = events[delivery_id]
        assert unpack_text(early.early_reply) == f"early:{value}"
        assert unpack_text(result.result.payload) == f"async:{value}"


@STREAMS
async def test_process_200_deliveries_to_a_sync_handler(tmp_path: Path, batch: int | None) -> None:
    values = [f"s{i}" for i in range(CONCURRENT)]
    async with serve_handler(write_handler(tmp_path, SYNC), handler_threads=1) as client:
        events = await process(client, deliveries(values), batch)
        assert client.host.dispatcher.sync_calls_pending == 0

    assert len(events) == CONCURRENT
    for delivery_id, value in enumerate(values, start=1):
        (event,) = events[delivery_id]
        assert unpack_text(event.result.payload) == f"sync:{value}"


@STREAMS
async def test_duplicate_in_flight_delivery_id_ends_the_stream(
    tmp_path: Path, batch: int | None
) -> None:
    async with serve_handler(write_handler(tmp_path, BLOCKING)) as client:
        context = client.host.dispatcher.context
        context.set("entered", asyncio.Event())
        context.set("release", asyncio.Event())
        first = deliveries(["a"])[0]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await process(client, [first, first], batch)
        context.get("release").set()

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "already in flight" in (caught.value.details() or "")


async def test_process_batch_writes_ready_results_together(tmp_path: Path) -> None:
    # All 200 are released at once: their Events are queued in the same few loop steps.
    items = deliveries([f"m{i}" for i in range(CONCURRENT)])
    batches = [runner_pb2.DeliveryBatch(deliveries=items)]
    async with serve_handler(write_handler(tmp_path, GATED_ASYNC)) as client:
        replies = [reply async for reply in client.stub.ProcessBatch(_aiter(batches))]

    sizes = [len(reply.events) for reply in replies]
    assert sum(sizes) == 2 * CONCURRENT  # an early reply and a Result each
    assert len(replies) < CONCURRENT, sizes  # far fewer stream messages than events


GATED_ECHO = """
import asyncio

async def handler(ctx, data):
    if ctx.get("all_inside") is None:
        ctx.set("all_inside", asyncio.Event())
        ctx.set("inside", 0)
    ctx.set("inside", ctx.get("inside") + 1)
    if ctx.get("inside") == 8:
        ctx.get("all_inside").set()
    await asyncio.wait_for(ctx.get("all_inside").wait(), 60)
    return data
"""


async def test_event_batches_stay_under_the_grpc_message_limit(tmp_path: Path) -> None:
    # 8 results of 40 KB ready at once, a 200 KB limit: they cannot go in one EventBatch.
    limit = 200_000
    items = deliveries([str(n) * 40_000 for n in range(8)])
    batches = [
        runner_pb2.DeliveryBatch(deliveries=items[:4]),
        runner_pb2.DeliveryBatch(deliveries=items[4:]),
    ]
    handler = write_handler(tmp_path, GATED_ECHO)
    async with serve_handler(handler, grpc_max_message_bytes=limit) as client:
        replies = [reply async for reply in client.stub.ProcessBatch(_aiter(batches))]

    assert sorted(e.delivery_id for r in replies for e in r.events) == list(range(1, 9))
    assert all(reply.ByteSize() <= limit for reply in replies)
    assert len(replies) < 8  # still batched


async def test_unix_socket_with_a_stale_socket_file(tmp_path: Path) -> None:
    socket_path = tmp_path / "run" / "handler.sock"
    socket_path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(socket_path))
    stale.close()  # the file stays, as after a crash
    assert socket_path.is_socket()

    handler_dir = tmp_path / "code"
    handler_dir.mkdir()
    address = f"unix://{socket_path}"
    async with serve_handler(write_handler(handler_dir, MULTI), address=address) as client:
        assert client.host.port == 0
        assert client.host.target == address
        reply = await client.handle(text("over unix"))

    assert unpack_text(reply.result.payload) == "echo:over unix"


async def test_health_not_serving_until_init_has_returned(tmp_path: Path) -> None:
    settings = HostSettings(
        base_path=write_handler(tmp_path, INIT_WAITS),
        handler_path="handler.py",
        handler_address="127.0.0.1:0",
    )
    context = Context(settings.base_path)
    context.set("release_init", asyncio.Event())
    user_code = load_user_code(settings.base_path, settings.handler_path)
    host = await start_server(settings, user_code, context)
    try:
        async with grpc.aio.insecure_channel(host.target) as channel:
            for service in ("", SERVICE_NAME):
                assert await health_status(channel, service) == NOT_SERVING
            init = asyncio.create_task(host.run_init())
            assert await health_status(channel) == NOT_SERVING
            assert not init.done()

            context.get("release_init").set()
            await init
            await host.set_serving()
            for service in ("", SERVICE_NAME):
                assert await health_status(channel, service) == SERVING
            await host.set_not_serving()
            assert await health_status(channel) == NOT_SERVING
    finally:
        await host.stop(0)


async def test_start_host_reports_serving(tmp_path: Path) -> None:
    settings = HostSettings(
        base_path=write_handler(tmp_path, MULTI),
        handler_path="handler.py",
        handler_address="127.0.0.1:0",
    )
    host = await start_host(settings)
    try:
        assert host.port > 0
        async with grpc.aio.insecure_channel(host.target) as channel:
            assert await health_status(channel) == SERVING
            assert await health_status(channel, SERVICE_NAME) == SERVING
    finally:
        await host.stop(0)


async def test_stop_finishes_in_flight_then_ends_the_stream(tmp_path: Path) -> None:
    async with serve_handler(write_handler(tmp_path, BLOCKING)) as client:
        host: HostServer = client.host
        context = host.dispatcher.context
        context.set("entered", asyncio.Event())
        context.set("release", asyncio.Event())
        outgoing: asyncio.Queue[runner_pb2.Delivery | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[runner_pb2.Delivery]:
            while (item := await outgoing.get()) is not None:
                yield item

        watch = health_pb2_grpc.HealthStub(client.channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == SERVING
        call = client.stub.Process(requests())
        first, late = deliveries(["first", "late"])
        await outgoing.put(first)
        await asyncio.wait_for(context.get("entered").wait(), 10)

        # Shutdown with a long grace: it must end as soon as the delivery is done.
        stopping = asyncio.create_task(host.stop(60))
        assert (await watch.read()).status == NOT_SERVING
        await outgoing.put(late)  # arrives after shutdown began: not run
        context.get("release").set()
        events = [event async for event in call]
        await asyncio.wait_for(stopping, 10)
        watch.cancel()

    assert [e.delivery_id for e in events] == [first.id]
    assert unpack_text(events[0].result.payload) == "released"
    assert await call.code() == grpc.StatusCode.OK


async def test_greeter_example(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    async with serve_handler("examples/greeter", "handler.py") as client:
        # The host put the handler's folder on sys.path, as KRE does: import as it does.
        public_input_pb2 = importlib.import_module("public_input_pb2")
        reply = await client.handle(public_input_pb2.Request(name="Ada"))
        empty = await client.handle(public_input_pb2.Request())

    response = public_input_pb2.Response()
    assert reply.result.payload.Unpack(response)
    assert response.greeting.endswith(", Ada!")
    assert empty.result.failure.type == "ValueError"
    assert "Request.name is empty" in empty.result.failure.message


async def test_client_cancel_cancels_its_deliveries(tmp_path: Path) -> None:
    async with serve_handler(write_handler(tmp_path, BLOCKING)) as client:
        context = client.host.dispatcher.context
        context.set("entered", asyncio.Event())
        context.set("release", asyncio.Event())
        context.set("cancelled", asyncio.Event())
        stream_done = asyncio.Event()

        async def requests() -> AsyncIterator[runner_pb2.Delivery]:
            yield deliveries(["blocked"])[0]
            await stream_done.wait()

        call = client.stub.Process(requests())
        await asyncio.wait_for(context.get("entered").wait(), 10)
        call.cancel()
        stream_done.set()
        # The host learns it through the transport: the handler's task is cancelled.
        await asyncio.wait_for(context.get("cancelled").wait(), 10)

        # The host goes on serving.
        context.get("release").set()
        reply = await client.stub.Handle(deliveries(["x"])[0])

    assert unpack_text(reply.result.payload) == "released"


async def test_server_reflection_lists_the_services(multi: HandlerClient) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(multi.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = [reply async for reply in stub.ServerReflectionInfo(iter([request]))]

    names = {service.name for service in replies[0].list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
