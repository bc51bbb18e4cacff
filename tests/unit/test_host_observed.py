"""Log tags, metrics and timing per delivery (the dispatch hooks), worked out when needed."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from google.protobuf import any_pb2, wrappers_pb2

from handler_host import logs, metrics
from handler_host.context import Context, pack_any
from handler_host.dispatch import Dispatcher, DispatchObserver
from handler_host.errors import EarlyReplyError
from handler_host.loader import UserCode
from handler_host.logs import DeliveryTags, MessageTags
from handler_host.metrics import DeliveryMetrics
from handler_host.timing import TimingRecorder, record_timing
from protos import kre_nats_msg_pb2, runner_pb2

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def delivery(
    text: str = "in", *, tracking_id: str = "t-1", headers: dict[str, str] | None = None
) -> runner_pb2.Delivery:
    message = kre_nats_msg_pb2.KreNatsMessage(
        tracking_id=tracking_id, payload=pack_any(wrappers_pb2.StringValue(value=text))
    )
    return runner_pb2.Delivery(id=7, message=message, attempt=2, headers=headers or {})


async def no_early(payload: any_pb2.Any) -> None:
    raise AssertionError("no early reply expected")


def unpack(data: any_pb2.Any) -> str:
    value = wrappers_pb2.StringValue()
    data.Unpack(value)
    return value.value


async def handler(ctx: Any, data: any_pb2.Any) -> wrappers_pb2.StringValue | None:
    match unpack(data):
        case "quiet":
            return None
        case "log":
            ctx.logger.info("scored")
            logging.getLogger("user.lib").info("a plain logger")
        case "raise":
            raise KeyError("no such row")
        case "slow":
            await asyncio.sleep(0.01)
    return wrappers_pb2.StringValue(value="ok")


@pytest.fixture
async def dispatcher(tmp_path: Path) -> AsyncIterator[Dispatcher]:
    executor = ThreadPoolExecutor(1, thread_name_prefix="test-user")
    code = UserCode(handler, None, ModuleType("user"), tmp_path / "handler.py")
    context = Context(str(tmp_path), node_name="scorer")
    observers = (DeliveryMetrics(), TimingRecorder(context))
    yield Dispatcher(code, context, executor, observers=observers)
    executor.shutdown(wait=True)


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    level = root.level
    text = io.StringIO()
    logs.configure("json", "INFO", node="scorer", stream=text)
    yield text
    for handler in [h for h in root.handlers if h.get_name() == "kre-handler-host"]:
        root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def tags_made(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """The arguments of each ``MessageTags.of`` call (the work a logged line needs)."""
    made: list[tuple[Any, ...]] = []
    real = MessageTags.of.__func__  # type: ignore[attr-defined]

    def counted(cls: type[MessageTags], *args: Any) -> MessageTags:
        made.append(args)
        return real(cls, *args)  # type: ignore[no-any-return]

    monkeypatch.setattr(MessageTags, "of", classmethod(counted))
    return made


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def test_no_tags_are_worked_out_for_a_delivery_that_logs_nothing(
    dispatcher: Dispatcher, stream: io.StringIO, tags_made: list[tuple[Any, ...]]
) -> None:
    result = await dispatcher.dispatch(
        delivery("quiet", headers={"traceparent": TRACEPARENT}), no_early
    )

    assert result.WhichOneof("outcome") is None
    assert tags_made == []
    assert stream.getvalue() == ""


async def test_a_logged_line_gets_the_tags_worked_out_once(
    dispatcher: Dispatcher, stream: io.StringIO, tags_made: list[tuple[Any, ...]]
) -> None:
    headers = {"TraceParent": TRACEPARENT.upper(), "other": "x"}
    await dispatcher.dispatch(delivery("log", headers=headers), no_early)

    assert len(tags_made) == 1
    ctx_line, plain_line = (json.loads(line) for line in stream.getvalue().splitlines())
    for line, logger in ((ctx_line, "kre.user"), (plain_line, "user.lib")):
        assert line["logger"] == logger
        assert (line["node"], line["tracking_id"], line["attempt"]) == ("scorer", "t-1", 2)
        assert line["traceparent"] == TRACEPARENT


def test_lazy_tags_are_cleaned_as_eager_ones(stream: io.StringIO) -> None:
    headers = {"Kre-Tracking-Id": "h\n1", "traceparent": "00-xyz\nINFO fake line"}
    with logs.bind(DeliveryTags("scorer", delivery(tracking_id="", headers=headers))):
        logging.getLogger("user.lib").info("inside")

    (line,) = (json.loads(line) for line in stream.getvalue().splitlines())
    assert line["tracking_id"] == "h?1"
    assert "traceparent" not in line
    tags = DeliveryTags("n", delivery(tracking_id="", headers=headers)).resolve()
    assert tags == MessageTags.of("n", "", 2, headers)


async def test_outcomes_errors_and_durations_are_counted(dispatcher: Dispatcher) -> None:
    seconds = "kre_handler_host_handler_seconds"
    before = {
        "payload": sample(f"{seconds}_count", outcome="payload"),
        "sum": sample(f"{seconds}_sum", outcome="payload"),
        "failure": sample(f"{seconds}_count", outcome="failure"),
        "key": sample("kre_handler_host_errors_total", type="KeyError"),
    }

    await dispatcher.dispatch(delivery("slow"), no_early)
    await dispatcher.dispatch(delivery("plain"), no_early)
    result = await dispatcher.dispatch(delivery("raise"), no_early)

    assert result.failure.type == "KeyError"
    assert sample(f"{seconds}_count", outcome="payload") == before["payload"] + 2
    assert sample(f"{seconds}_sum", outcome="payload") >= before["sum"] + 0.01
    assert sample(f"{seconds}_count", outcome="failure") == before["failure"] + 1
    assert sample("kre_handler_host_errors_total", type="KeyError") == before["key"] + 1
    assert sample("kre_handler_host_in_flight") == 0


async def test_ctx_logger_is_built_on_first_use_and_can_be_replaced(tmp_path: Path) -> None:
    async def emit(payload: any_pb2.Any) -> None:
        raise AssertionError

    ctx = Context(str(tmp_path), node_name="scorer")
    with logs.bind(DeliveryTags("scorer", delivery(headers={"traceparent": TRACEPARENT}))):
        message_ctx = ctx.for_message("t-1", replied=False, emit_early=emit)
    assert message_ctx.logger is message_ctx.logger
    assert message_ctx.logger.extra == {
        "kre_node": "scorer",
        "kre_tracking_id": "t-1",
        "kre_attempt": 2,
        "kre_traceparent": TRACEPARENT,
    }

    mine = logging.LoggerAdapter(logging.getLogger("mine"))
    message_ctx.logger = mine  # type: ignore[assignment]
    assert message_ctx.logger is mine


def stamped(result: runner_pb2.Result) -> runner_pb2.Result:
    result.start.FromNanoseconds(1_700_000_000_123_456_000)
    result.end.FromNanoseconds(1_700_000_000_223_456_000)
    return result


@pytest.mark.parametrize("with_influx", [False, True])
def test_timing_is_worked_out_only_with_influxdb(with_influx: bool) -> None:
    calls: list[dict[str, Any]] = []
    services = SimpleNamespace(
        measurement=object() if with_influx else None,
        record_node_elapsed=lambda **kwargs: calls.append(kwargs),
    )
    item = delivery()
    entry = item.message.tracking.add(node_name="entry", start="", end="2023-11-14T22:13:20Z")

    record_timing(services, item, stamped(runner_pb2.Result()), last_node=False)

    if not with_influx:
        assert calls == []
        return
    (call,) = calls
    assert call["start"] == datetime.fromisoformat("2023-11-14T22:13:20.123456+00:00")
    assert call["end"] == datetime.fromisoformat("2023-11-14T22:13:20.223456+00:00")
    assert call["previous_end"] == datetime.fromisoformat(entry.end)
    assert (call["tracking_id"], call["node_from"]) == ("t-1", "entry")


class Recorder(DispatchObserver):
    """Writes down every hook call, with what the hook was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def init_finished(self, seconds: float) -> None:
        self.calls.append(("init", seconds))

    def started(self, delivery: runner_pb2.Delivery) -> None:
        self.calls.append(("started", delivery, logs.current_tags()))

    def early_reply_sent(self) -> None:
        self.calls.append(("early",))

    def finished(self, delivery: runner_pb2.Delivery, result: runner_pb2.Result | None) -> None:
        self.calls.append(("finished", delivery, result, logs.current_tags()))


async def test_observers_are_told_each_step_inside_the_delivery_tags(tmp_path: Path) -> None:
    async def replying(ctx: Any, data: any_pb2.Any) -> wrappers_pb2.StringValue:
        await ctx.early_reply(wrappers_pb2.StringValue(value="early"))
        return wrappers_pb2.StringValue(value="late")

    async def init(ctx: Any) -> None:
        await asyncio.sleep(0.01)

    first, second = Recorder(), Recorder()
    executor = ThreadPoolExecutor(1)
    code = UserCode(replying, init, ModuleType("user"), tmp_path / "handler.py")
    dispatcher = Dispatcher(code, Context(str(tmp_path)), executor, observers=(first, second))
    sent: list[any_pb2.Any] = []

    async def emit(payload: any_pb2.Any) -> None:
        sent.append(payload)

    await dispatcher.run_init()
    item = delivery()
    result = await dispatcher.dispatch(item, emit)
    executor.shutdown()

    assert first.calls == second.calls
    (_, seconds), started, early, finished = first.calls
    assert seconds >= 0.01
    assert started[:2] == ("started", item) and early == ("early",) and len(sent) == 1
    assert finished[:3] == ("finished", item, result)  # the very Result returned
    assert unpack(result.payload) == "late"
    for tags in (started[2], finished[3]):
        assert tags is not None and tags.resolve().tracking_id == "t-1"


async def test_observers_see_a_cancelled_delivery_end_without_a_result(tmp_path: Path) -> None:
    entered = asyncio.Event()

    async def hanging(ctx: Any, data: any_pb2.Any) -> None:
        entered.set()
        await asyncio.Event().wait()

    recorder = Recorder()
    in_flight = sample("kre_handler_host_in_flight")
    code = UserCode(hanging, None, ModuleType("user"), tmp_path / "handler.py")
    observers = (DeliveryMetrics(), recorder)
    executor = ThreadPoolExecutor(1)
    dispatcher = Dispatcher(code, Context(str(tmp_path)), executor, observers=observers)

    task = asyncio.create_task(dispatcher.dispatch(delivery(), no_early))
    await entered.wait()
    assert sample("kre_handler_host_in_flight") == in_flight + 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    executor.shutdown()

    assert [call[0] for call in recorder.calls] == ["started", "finished"]
    assert recorder.calls[-1][2] is None
    assert sample("kre_handler_host_in_flight") == in_flight


async def test_early_replies_are_counted_once_sent(tmp_path: Path) -> None:
    async def replying(ctx: Any, data: any_pb2.Any) -> None:
        await ctx.early_reply(wrappers_pb2.StringValue(value="small"))
        with pytest.raises(EarlyReplyError):  # over the limit: refused, not counted
            await ctx.early_reply(wrappers_pb2.StringValue(value="x" * 200))

    sent: list[any_pb2.Any] = []

    async def emit(payload: any_pb2.Any) -> None:
        sent.append(payload)

    before = sample("kre_handler_host_early_replies_total")
    code = UserCode(replying, None, ModuleType("user"), tmp_path / "handler.py")
    executor = ThreadPoolExecutor(1)
    dispatcher = Dispatcher(
        code,
        Context(str(tmp_path)),
        executor,
        max_message_bytes=100,
        observers=(DeliveryMetrics(),),
    )
    result = await dispatcher.dispatch(delivery(), emit)
    executor.shutdown()

    assert result.WhichOneof("outcome") is None, result.failure.message
    assert len(sent) == 1
    assert sample("kre_handler_host_early_replies_total") == before + 1


@pytest.mark.parametrize("last_node", [False, True])
async def test_timing_is_recorded_from_the_result(tmp_path: Path, last_node: bool) -> None:
    calls: list[dict[str, Any]] = []
    services = SimpleNamespace(
        measurement=object(), record_node_elapsed=lambda **kwargs: calls.append(kwargs)
    )
    context = Context(str(tmp_path), is_last_node=last_node, services=services)
    code = UserCode(handler, None, ModuleType("user"), tmp_path / "handler.py")
    executor = ThreadPoolExecutor(1)
    dispatcher = Dispatcher(code, context, executor, observers=(TimingRecorder(context),))
    item = delivery()
    item.message.tracking.add(node_name="entry", start="2023-11-14T22:13:19", end="")

    result = await dispatcher.dispatch(item, no_early)
    executor.shutdown()

    (call,) = calls
    assert call["start"] == result.start.ToDatetime(tzinfo=UTC)
    assert call["end"] == result.end.ToDatetime(tzinfo=UTC)
    assert call["node_from"] == "entry"
    expected = datetime(2023, 11, 14, 22, 13, 19, tzinfo=UTC) if last_node else None
    assert call["workflow_start"] == expected
