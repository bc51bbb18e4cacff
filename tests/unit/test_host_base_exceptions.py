"""sys.exit(), KeyboardInterrupt and other BaseExceptions from user code never end the host.

Every path: sync and async handlers, with and without KRT_HANDLER_TIMEOUT, and init(ctx).
Plus the threads that watch from outside the loop: a blocked loop is reported with the
delivery that blocks it, and a long init(ctx) says it is still running.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from google.protobuf import any_pb2, wrappers_pb2

from handler_host import watchdog
from handler_host.context import Context, pack_any
from handler_host.dispatch import Dispatcher
from handler_host.errors import InitError, failure_of
from handler_host.loader import UserCode
from protos import kre_nats_msg_pb2, runner_pb2
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(30)


class Custom(BaseException):
    pass


def delivery(text: str = "in") -> runner_pb2.Delivery:
    message = kre_nats_msg_pb2.KreNatsMessage(
        tracking_id=f"t-{text}", payload=pack_any(wrappers_pb2.StringValue(value=text))
    )
    return runner_pb2.Delivery(id=7, message=message, attempt=1, stream_sequence=42)


async def no_early(payload: any_pb2.Any) -> None:
    raise AssertionError("no early reply expected")


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., Dispatcher]]:
    executors: list[ThreadPoolExecutor] = []

    def build(handler: Callable[..., Any], init: Any = None, **options: Any) -> Dispatcher:
        executor = ThreadPoolExecutor(1, thread_name_prefix="test-user")
        executors.append(executor)
        code = UserCode(handler, init, ModuleType("user"), tmp_path / "handler.py")
        return Dispatcher(code, Context(str(tmp_path)), executor, threads=1, **options)

    yield build
    for executor in executors:
        executor.shutdown(wait=True)


RAISES = [
    (lambda: sys.exit(3), "SystemExit", "the handler called sys.exit(3)"),
    (lambda: sys.exit(), "SystemExit", "the handler called sys.exit()"),
    (lambda: sys.exit("bye"), "SystemExit", "the handler called sys.exit('bye')"),
    (KeyboardInterrupt, "KeyboardInterrupt", "the handler raised KeyboardInterrupt"),
    (lambda: (_ for _ in ()).throw(Custom("odd")), "Custom", "the handler raised Custom: odd"),
]


def _raise(how: Callable[[], object]) -> None:
    if isinstance(how, type):
        raise how()
    how()


@pytest.mark.parametrize("timeout", [0.0, 2.0])
@pytest.mark.parametrize("is_async", [False, True])
@pytest.mark.parametrize(("how", "kind", "says"), RAISES)
async def test_a_base_exception_is_the_failure_and_the_host_carries_on(
    make: Callable[..., Dispatcher],
    caplog: pytest.LogCaptureFixture,
    how: Callable[[], object],
    kind: str,
    says: str,
    is_async: bool,
    timeout: float,
) -> None:
    def sync_handler(ctx: Any, data: any_pb2.Any) -> None:
        _raise(how)

    async def async_handler(ctx: Any, data: any_pb2.Any) -> None:
        await asyncio.sleep(0)
        _raise(how)

    dispatcher = make(async_handler if is_async else sync_handler, timeout=timeout)
    with caplog.at_level(logging.ERROR, logger="handler_host.dispatch"):
        result = await dispatcher.dispatch(delivery("bad"), no_early)
        await asyncio.sleep(0.01)  # the loop still turns: nothing escaped into it
    assert result.failure.message == says
    assert result.failure.type == kind
    assert not result.failure.retryable
    line = next(r.getMessage() for r in caplog.records if says in r.getMessage())
    assert "delivery 7 (stream seq 42, tracking_id=t-bad)" in line
    assert "the host carries on" in line


def test_the_failure_of_sys_exit_says_what_happened() -> None:
    assert failure_of(SystemExit(3)).message == "the handler called sys.exit(3)"
    assert failure_of(ValueError("plain")).message == "plain"


@pytest.mark.parametrize("is_async", [False, True])
@pytest.mark.parametrize(
    ("raised", "says"),
    [(SystemExit(3), "called sys.exit(3)"), (KeyboardInterrupt(), "raised KeyboardInterrupt")],
)
async def test_init_calling_sys_exit_or_interrupted_is_an_init_error(
    make: Callable[..., Dispatcher], raised: BaseException, says: str, is_async: bool
) -> None:
    def sync_init(ctx: Any) -> None:
        raise raised

    async def async_init(ctx: Any) -> None:
        raise raised

    dispatcher = make(lambda ctx, data: None, async_init if is_async else sync_init)
    with pytest.raises(InitError, match=r"init\(ctx\) in .* " + re.escape(says)):
        await dispatcher.run_init()


async def test_a_long_init_says_it_is_still_running(
    make: Callable[..., Dispatcher],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watchdog, "INIT_PROGRESS_EVERY", 0.1)

    def init(ctx: Any) -> None:
        time.sleep(0.35)

    dispatcher = make(lambda ctx, data: None, init)
    with caplog.at_level(logging.INFO, logger="handler_host.watchdog"):
        await dispatcher.run_init()
    lines = [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]
    assert len(lines) >= 2 and lines[0].startswith("init(ctx) still running after 0s")


async def test_a_blocked_loop_is_reported_with_the_delivery_that_blocks_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    running: dict[asyncio.Future[Any], watchdog.Running] = {}
    dog = watchdog.LoopWatchdog(
        asyncio.get_running_loop(), running, stall_seconds=0.3, check_every=0.05
    )

    async def blocking() -> None:
        await asyncio.sleep(0.1)  # the watchdog has seen the loop turn
        time.sleep(0.8)  # noqa: ASYNC251 - the fault under test

    task = asyncio.ensure_future(blocking())
    running[task] = watchdog.Running(7, 42, "t-slow", time.monotonic())
    with caplog.at_level(logging.WARNING, logger="handler_host.watchdog"):
        dog.start()
        await task
        await eventually(lambda: "turns again" in caplog.text, 5, "the loop turning again")
    dog.stop()
    line = next(r.getMessage() for r in caplog.records if "has not turned" in r.getMessage())
    assert "delivery 7 (stream seq 42, tracking id t-slow" in line
