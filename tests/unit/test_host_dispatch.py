"""Dispatcher: exactly one Result per delivery, whatever the handler does."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from google.protobuf import any_pb2, wrappers_pb2

from handler_host import RetryableError
from handler_host.context import Context, pack_any
from handler_host.dispatch import Dispatcher
from handler_host.errors import MAX_FAILURE_MESSAGE_CHARS, InitError
from handler_host.loader import UserCode
from protos import kre_nats_msg_pb2, runner_pb2


def delivery(text: str = "in", *, replied: bool = False) -> runner_pb2.Delivery:
    message = kre_nats_msg_pb2.KreNatsMessage(
        tracking_id="t-1", payload=pack_any(wrappers_pb2.StringValue(value=text)), replied=replied
    )
    return runner_pb2.Delivery(id=7, message=message, attempt=1)


async def no_early(payload: any_pb2.Any) -> None:
    raise AssertionError("no early reply expected")


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., Dispatcher]]:
    executors: list[ThreadPoolExecutor] = []

    def build(
        handler: Callable[..., Any], init: Callable[..., Any] | None = None, threads: int = 1
    ) -> Dispatcher:
        executor = ThreadPoolExecutor(threads, thread_name_prefix="test-user")
        executors.append(executor)
        code = UserCode(handler, init, ModuleType("user"), tmp_path / "handler.py")
        return Dispatcher(code, Context(str(tmp_path)), executor)

    yield build
    for executor in executors:
        executor.shutdown(wait=True)


def text_of(result: runner_pb2.Result) -> str:
    value = wrappers_pb2.StringValue()
    assert result.payload.Unpack(value)
    return value.value


def unpack(data: any_pb2.Any) -> str:
    value = wrappers_pb2.StringValue()
    data.Unpack(value)
    return value.value


async def test_sync_handler_result_is_packed(make: Callable[..., Dispatcher]) -> None:
    seen: list[str] = []

    def handler(ctx: Any, data: any_pb2.Any) -> wrappers_pb2.StringValue:
        seen.append(threading.current_thread().name)
        return wrappers_pb2.StringValue(value=unpack(data).upper())

    result = await make(handler).dispatch(delivery("hi"), no_early)

    assert text_of(result) == "HI"
    assert seen[0].startswith("test-user")  # ran in the pool, not on the loop
    assert result.start.ToDatetime() <= result.end.ToDatetime()
    assert result.start.seconds > 0


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_stamps_are_the_wall_clock_in_whole_microseconds(
    make: Callable[..., Dispatcher], kind: str
) -> None:
    def sync(ctx: Any, data: Any) -> None:
        time.sleep(0.002)

    async def coro(ctx: Any, data: Any) -> None:
        await asyncio.sleep(0.002)

    before = time.time_ns() // 1000 * 1000
    result = await make(sync if kind == "sync" else coro).dispatch(delivery(), no_early)
    after = time.time_ns()

    start, end = result.start.ToNanoseconds(), result.end.ToNanoseconds()
    assert before <= start <= end <= after
    assert end - start >= 2_000_000  # the handler's own time, not the dispatcher's
    assert start % 1000 == 0 and end % 1000 == 0  # the precision of a datetime


async def test_async_handler_runs_on_the_loop(make: Callable[..., Dispatcher]) -> None:
    async def handler(ctx: Any, data: any_pb2.Any) -> wrappers_pb2.StringValue:
        assert threading.current_thread() is threading.main_thread()
        return wrappers_pb2.StringValue(value=ctx.tracking_id)

    assert text_of(await make(handler).dispatch(delivery(), no_early)) == "t-1"


async def test_none_sets_neither_field(make: Callable[..., Dispatcher]) -> None:
    result = await make(lambda ctx, data: None).dispatch(delivery(), no_early)
    assert result.WhichOneof("outcome") is None
    assert result.HasField("start") and result.HasField("end")


async def test_returned_any_is_not_nested(make: Callable[..., Dispatcher]) -> None:
    result = await make(lambda ctx, data: data).dispatch(delivery("same"), no_early)
    assert text_of(result) == "same"


async def test_non_protobuf_return_is_a_failure(make: Callable[..., Dispatcher]) -> None:
    result = await make(lambda ctx, data: {"a": 1}).dispatch(delivery(), no_early)

    assert result.failure.type == "InvalidHandlerResult"
    assert "builtins.dict" in result.failure.message
    assert "return a protobuf message" in result.failure.message
    assert "or None" in result.failure.message
    assert not result.failure.retryable


async def test_exception_becomes_failure(make: Callable[..., Dispatcher]) -> None:
    def handler(ctx: Any, data: Any) -> None:
        raise KeyError("missing column")

    result = await make(handler).dispatch(delivery(), no_early)

    failure = result.failure
    assert (failure.type, failure.message, failure.retryable) == (
        "KeyError",
        "'missing column'",
        False,
    )
    assert "in handler" in failure.traceback
    assert "handler_host/dispatch.py" not in failure.traceback
    assert "concurrent/futures" not in failure.traceback
    assert result.start.ToDatetime() <= result.end.ToDatetime()


async def test_retryable_error(make: Callable[..., Dispatcher]) -> None:
    class DatabaseBusy(RetryableError):
        pass

    async def handler(ctx: Any, data: Any) -> None:
        raise DatabaseBusy("try later")

    failure = (await make(handler).dispatch(delivery(), no_early)).failure
    assert (failure.type, failure.message, failure.retryable) == ("DatabaseBusy", "try later", True)


@pytest.mark.parametrize("exc", [asyncio.CancelledError(), SystemExit(3), KeyboardInterrupt()])
async def test_base_exceptions_raised_by_the_handler(
    make: Callable[..., Dispatcher], exc: BaseException
) -> None:
    async def handler(ctx: Any, data: Any) -> None:
        raise exc

    result = await make(handler).dispatch(delivery(), no_early)
    assert result.failure.type == type(exc).__name__


async def test_system_exit_in_a_sync_handler(make: Callable[..., Dispatcher]) -> None:
    def handler(ctx: Any, data: Any) -> None:
        raise SystemExit(1)

    assert (await make(handler).dispatch(delivery(), no_early)).failure.type == "SystemExit"


async def test_unprintable_and_huge_exceptions(make: Callable[..., Dispatcher]) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    def broken(ctx: Any, data: Any) -> None:
        raise Unprintable()

    def huge(ctx: Any, data: Any) -> None:
        raise ValueError("x" * (MAX_FAILURE_MESSAGE_CHARS * 2) + "\udc80")

    assert (
        "whose str() raised" in (await make(broken).dispatch(delivery(), no_early)).failure.message
    )
    message = (await make(huge).dispatch(delivery(), no_early)).failure.message
    assert message.endswith("...(truncated)")
    assert len(message) < MAX_FAILURE_MESSAGE_CHARS + 20


async def test_sync_handler_cannot_early_reply(make: Callable[..., Dispatcher]) -> None:
    def handler(ctx: Any, data: Any) -> None:
        ctx.early_reply(wrappers_pb2.StringValue(value="x"))

    failure = (await make(handler).dispatch(delivery(), no_early)).failure
    assert failure.type == "EarlyReplyError"
    assert "async def handler" in failure.message


async def test_early_reply_reaches_the_emitter(make: Callable[..., Dispatcher]) -> None:
    emitted: list[any_pb2.Any] = []

    async def emit(payload: any_pb2.Any) -> None:
        emitted.append(payload)

    async def handler(ctx: Any, data: Any) -> None:
        await ctx.early_reply(wrappers_pb2.StringValue(value="early"))

    result = await make(handler).dispatch(delivery(), emit)

    assert result.WhichOneof("outcome") is None
    assert [unpack(p) for p in emitted] == ["early"]


async def test_sync_callable_returning_a_coroutine_is_awaited(
    make: Callable[..., Dispatcher],
) -> None:
    async def real(ctx: Any, data: Any) -> wrappers_pb2.StringValue:
        return wrappers_pb2.StringValue(value="awaited")

    def wrapped(ctx: Any, data: Any) -> Any:  # a decorator that hid ``async def``
        return real(ctx, data)

    assert text_of(await make(wrapped).dispatch(delivery(), no_early)) == "awaited"


async def test_one_thread_never_runs_two_sync_handlers_at_once(
    make: Callable[..., Dispatcher],
) -> None:
    lock = threading.Lock()
    inside = 0
    most = 0

    def handler(ctx: Any, data: Any) -> wrappers_pb2.StringValue:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        with lock:
            inside -= 1
        return wrappers_pb2.StringValue(value=unpack(data))

    dispatcher = make(handler, threads=1)
    results = await asyncio.gather(
        *(dispatcher.dispatch(delivery(str(i)), no_early) for i in range(50))
    )

    assert [text_of(r) for r in results] == [str(i) for i in range(50)]
    assert most == 1
    assert dispatcher.sync_calls_pending == 0


async def test_init_gets_the_shared_context(make: Callable[..., Dispatcher]) -> None:
    def init(ctx: Any) -> None:
        ctx.set("threads", threading.current_thread().name)

    dispatcher = make(lambda ctx, data: None, init=init)
    await dispatcher.run_init()

    assert dispatcher.context.get("threads").startswith("test-user")


async def test_init_error(make: Callable[..., Dispatcher]) -> None:
    async def init(ctx: Any) -> None:
        raise FileNotFoundError("data/model.bin")

    with pytest.raises(InitError) as caught:
        await make(lambda ctx, data: None, init=init).run_init()

    assert isinstance(caught.value.cause, FileNotFoundError)
    assert "init(ctx)" in str(caught.value)
    assert "data/model.bin" in str(caught.value)
    assert "in init" in caught.value.traceback


async def test_cancellation_of_the_dispatch_propagates(make: Callable[..., Dispatcher]) -> None:
    entered = asyncio.Event()

    async def handler(ctx: Any, data: Any) -> None:
        entered.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(make(handler).dispatch(delivery(), no_early))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_early_exit_marks_the_result(make: Callable[..., Dispatcher], kind: str) -> None:
    def sync_handler(ctx: Any, data: any_pb2.Any) -> wrappers_pb2.StringValue:
        if unpack(data) == "stop":
            ctx.early_exit()
        return wrappers_pb2.StringValue(value="done")

    async def async_handler(ctx: Any, data: any_pb2.Any) -> wrappers_pb2.StringValue:
        if unpack(data) == "stop":
            ctx.early_exit()
            ctx.early_exit()  # twice is once
        return wrappers_pb2.StringValue(value="done")

    dispatcher = make(sync_handler if kind == "sync" else async_handler)
    stopped = await dispatcher.dispatch(delivery("stop"), no_early)
    after = await dispatcher.dispatch(delivery("go on"), no_early)

    assert stopped.early_exit is True
    assert text_of(stopped) == "done"
    assert after.early_exit is False  # each message's ctx starts unmarked


async def test_early_exit_in_init_is_an_init_error(make: Callable[..., Dispatcher]) -> None:
    def init(ctx: Any) -> None:
        ctx.early_exit()

    dispatcher = make(lambda ctx, data: None, init)
    with pytest.raises(InitError, match=r"ctx\.early_exit only works inside handler"):
        await dispatcher.run_init()
