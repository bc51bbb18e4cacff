"""KRT_HANDLER_TIMEOUT and the gRPC size limit in the handler host's dispatch."""

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

from handler_host.context import Context, pack_any
from handler_host.dispatch import Dispatcher
from handler_host.loader import UserCode
from protos import kre_nats_msg_pb2, runner_pb2
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(30)


def delivery(text: str = "in") -> runner_pb2.Delivery:
    message = kre_nats_msg_pb2.KreNatsMessage(
        tracking_id=f"t-{text}", payload=pack_any(wrappers_pb2.StringValue(value=text))
    )
    return runner_pb2.Delivery(id=7, message=message, attempt=1)


def unpack(data: any_pb2.Any) -> str:
    value = wrappers_pb2.StringValue()
    data.Unpack(value)
    return value.value


async def no_early(payload: any_pb2.Any) -> None:
    raise AssertionError("no early reply expected")


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., Dispatcher]]:
    executors: list[ThreadPoolExecutor] = []

    def build(handler: Callable[..., Any], threads: int = 1, **options: Any) -> Dispatcher:
        executor = ThreadPoolExecutor(threads, thread_name_prefix="test-user")
        executors.append(executor)
        code = UserCode(handler, None, ModuleType("user"), tmp_path / "handler.py")
        return Dispatcher(code, Context(str(tmp_path)), executor, threads=threads, **options)

    yield build
    for executor in executors:
        executor.shutdown(wait=True)


async def test_a_hung_async_handler_is_cancelled_and_the_next_one_runs(
    make: Callable[..., Dispatcher],
) -> None:
    cancelled = asyncio.Event()

    async def handler(ctx: Any, data: any_pb2.Any) -> wrappers_pb2.StringValue:
        if unpack(data) == "hang":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return wrappers_pb2.StringValue(value="ok")

    dispatcher = make(handler, timeout=0.2)
    started = time.monotonic()
    hung = await dispatcher.dispatch(delivery("hang"), no_early)

    assert 0.2 <= time.monotonic() - started < 2
    assert hung.failure.message == "handler timed out after 0.2s"
    assert hung.failure.type == "HandlerTimeout" and not hung.failure.retryable
    await asyncio.wait_for(cancelled.wait(), 1)
    ok = await dispatcher.dispatch(delivery("fine"), no_early)
    assert ok.WhichOneof("outcome") == "payload"


async def test_an_async_handler_that_ignores_cancellation_does_not_hold_the_result(
    make: Callable[..., Dispatcher],
) -> None:
    release = asyncio.Event()

    async def stubborn(ctx: Any, data: Any) -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # swallowed: bad manners, but it happens

    result = await make(stubborn, timeout=0.1).dispatch(delivery(), no_early)
    assert result.failure.message == "handler timed out after 0.1s"
    release.set()


async def test_a_hung_sync_handler_fails_at_once_and_keeps_its_thread(
    make: Callable[..., Dispatcher], caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()

    def handler(ctx: Any, data: any_pb2.Any) -> wrappers_pb2.StringValue:
        if unpack(data) == "hang":
            release.wait(10)
        return wrappers_pb2.StringValue(value="ok")

    dispatcher = make(handler, threads=2, timeout=0.2)
    hung = await dispatcher.dispatch(delivery("hang"), no_early)

    assert hung.failure.message == "handler timed out after 0.2s"
    assert dispatcher.stuck_threads == 1 and dispatcher.sync_calls_pending == 1
    assert "stays busy until the handler returns (1 of 2" in caplog.text
    # The other thread still serves.
    ok = await dispatcher.dispatch(delivery("fine"), no_early)
    assert unpack(ok.payload) == "ok"

    release.set()
    await eventually(lambda: dispatcher.stuck_threads == 0)
    assert dispatcher.sync_calls_pending == 0
    assert "its thread is free again" in caplog.text


async def test_with_every_thread_held_a_sync_message_is_retried_unrun(
    make: Callable[..., Dispatcher], caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()
    ran: list[str] = []

    def handler(ctx: Any, data: any_pb2.Any) -> None:
        ran.append(unpack(data))
        if unpack(data) == "hang":
            release.wait(10)

    dispatcher = make(handler, threads=1, timeout=0.2)
    await dispatcher.dispatch(delivery("hang"), no_early)
    assert "every handler thread (KRT_HANDLER_THREADS=1) is held" in caplog.text

    waiting = await dispatcher.dispatch(delivery("next"), no_early)

    assert waiting.failure.retryable  # the sidecar naks it: redelivered, not lost
    assert waiting.failure.type == "NoFreeHandlerThread"
    assert "no free handler thread within 0.2s (1 held by timed-out handlers)" in (
        waiting.failure.message
    )
    release.set()
    await eventually(lambda: dispatcher.sync_calls_pending == 0)
    assert ran == ["hang"]  # withdrawn from the pool: it never ran


async def test_queued_sync_messages_are_timed_from_their_start(
    make: Callable[..., Dispatcher],
) -> None:
    def handler(ctx: Any, data: Any) -> wrappers_pb2.StringValue:
        time.sleep(0.15)
        return wrappers_pb2.StringValue(value="ok")

    dispatcher = make(handler, threads=1, timeout=0.25)
    # The second waits 0.15 s for the thread, then runs 0.15 s: 0.3 s > the timeout in all.
    results = await asyncio.gather(*(dispatcher.dispatch(delivery(), no_early) for _ in range(2)))
    assert [r.WhichOneof("outcome") for r in results] == ["payload", "payload"]


async def test_no_timeout_by_default(make: Callable[..., Dispatcher]) -> None:
    async def handler(ctx: Any, data: Any) -> wrappers_pb2.StringValue:
        await asyncio.sleep(0.3)
        return wrappers_pb2.StringValue(value="slow")

    dispatcher = make(handler)
    assert dispatcher.timeout == 0
    result = await dispatcher.dispatch(delivery(), no_early)
    assert unpack(result.payload) == "slow"


async def test_a_result_over_the_grpc_limit_is_a_failure_not_a_broken_stream(
    make: Callable[..., Dispatcher],
) -> None:
    async def handler(ctx: Any, data: Any) -> wrappers_pb2.StringValue:
        return wrappers_pb2.StringValue(value="x" * 5000)

    result = await make(handler, max_message_bytes=4096).dispatch(delivery(), no_early)
    assert result.failure.type == "ResultTooLarge" and not result.failure.retryable
    assert "over the 4096 byte gRPC limit (KRT_GRPC_MAX_MESSAGE_BYTES)" in result.failure.message


async def test_an_early_reply_over_the_grpc_limit_raises_in_the_handler(
    make: Callable[..., Dispatcher],
) -> None:
    caught: list[str] = []

    async def handler(ctx: Any, data: Any) -> wrappers_pb2.StringValue:
        try:
            await ctx.early_reply(wrappers_pb2.StringValue(value="x" * 5000))
        except Exception as exc:
            caught.append(str(exc))
        return wrappers_pb2.StringValue(value="small")

    result = await make(handler, max_message_bytes=4096).dispatch(delivery(), no_early)
    assert unpack(result.payload) == "small"
    assert "the early reply is" in caught[0] and "4096 byte gRPC limit" in caught[0]
