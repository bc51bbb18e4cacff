"""How user code is called: on the event loop under a timeout, or in a worker thread.

Shared by ``handler_host.dispatch`` for ``init(ctx)`` and ``handler(ctx, data)``, with
the clock readings that stamp a Result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import timestamp_pb2

from handler_host.errors import HandlerTimeout, UserExit
from protos import runner_pb2

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Span:
    """When the user code was entered and when it returned (or raised); 0 until set."""

    start: int = 0
    end: int = 0


async def call_async(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    timeout: float,
    track: Callable[[asyncio.Future[Any]], None] | None = None,
) -> Any:
    if not timeout:  # in the caller's task, which catches whatever it raises
        return await fn(*args)
    # A task of its own: a BaseException escaping it would stop the event loop.
    task = asyncio.ensure_future(exits_as_errors(fn(*args)))
    if track is not None:
        track(task)
    try:
        finished, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if finished:
        return task.result()
    # Not awaited: a handler that ignores the cancellation must not hold the Result back.
    task.cancel()
    task.add_done_callback(_retrieve)
    raise HandlerTimeout(timeout)


async def exits_as_errors(awaitable: Awaitable[Any]) -> Any:
    """Await user code; a SystemExit or KeyboardInterrupt comes out as UserExit.

    asyncio re-raises those from a task into the loop itself, which ends the host with
    every delivery in it; a cancellation still goes through as it is.
    """
    try:
        return await awaitable
    except (Exception, asyncio.CancelledError):
        raise
    except BaseException as exc:
        raise UserExit(exc) from exc


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("a timed-out handler raised after its timeout: %r", task.exception())


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return event.is_set()
    return True


def threadsafe(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: the host is exiting
        pass


def call_sync(fn: Callable[..., Any], args: tuple[Any, ...], span: Span) -> Any:
    span.start = now()
    try:
        return fn(*args)
    finally:
        span.end = now()


def stamp(result: runner_pb2.Result, span: Span) -> None:
    end = span.end or now()
    _set(result.start, span.start or end)
    _set(result.end, end)


def _set(stamp: timestamp_pb2.Timestamp, nanos: int) -> None:
    # Timestamp.FromNanoseconds without its range check (a clock reading is in range);
    # FromDatetime goes through calendar.timegm, five times slower.
    stamp.seconds, stamp.nanos = divmod(nanos, 1_000_000_000)


def being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def clock() -> float:
    return time.monotonic()


def now() -> int:
    """Wall-clock nanoseconds since the epoch, in whole microseconds.

    Microseconds: what a datetime holds, and the sidecar's tracking entries and the
    InfluxDB timing are datetimes; a Result's stamps keep six fractional digits.
    """
    return time.time_ns() // 1000 * 1000
