"""Run user code: ``init(ctx)`` once, ``handler(ctx, data)`` per delivery.

``Dispatcher.dispatch`` is the one place both RPCs (Process and Handle) go through,
and it always returns exactly one ``Result``, whatever the handler does (as
Temporal's activity worker always builds exactly one completion).

Async handlers run on the event loop, as many at once as there are deliveries in
flight. Sync handlers run in a thread pool of ``KRT_HANDLER_THREADS`` threads
(default 1, so a model that is not thread-safe, a GPU model typically, is never
entered twice at once). ``ctx.early_reply`` is a coroutine, so only async handlers
can use it; from a sync handler it raises EarlyReplyError.

``KRT_HANDLER_TIMEOUT`` (seconds, 0 = no limit) bounds each message:

- an async handler still running after the timeout is cancelled;
- a sync handler must get a thread within the timeout, then return within the timeout
  of its start. A message that never got a thread is withdrawn from the pool unrun and
  fails as retryable (``NoFreeHandlerThread``: the sidecar naks it). A running thread
  cannot be stopped: the message fails at once, but the thread stays busy until the
  handler returns, and the host logs how many threads are held that way;
- either way the message fails with ``handler timed out after Ns`` (not retryable).

A Result or early reply larger than ``KRT_GRPC_MAX_MESSAGE_BYTES`` would break the
stream every message shares; it becomes a failure instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message

from handler_host.context import Context, EmitEarly
from handler_host.errors import (
    EarlyReplyError,
    InitError,
    InvalidHandlerResult,
    RetryableError,
    RunnerError,
    format_user_traceback,
)
from handler_host.loader import UserCode, is_async_callable
from protos import runner_pb2

logger = logging.getLogger(__name__)

# A failure travels inside a NATS message: keep the text bounded.
MAX_FAILURE_MESSAGE_CHARS = 16 * 1024
MAX_TRACEBACK_CHARS = 32 * 1024
# An Event's delivery id and framing, on top of the Result or early reply in it.
EVENT_ROOM = 32


class HandlerTimeout(RunnerError):
    """The handler ran longer than KRT_HANDLER_TIMEOUT."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        super().__init__(f"handler timed out after {seconds:g}s")


class NoFreeHandlerThread(RetryableError):
    """A sync handler's message waited KRT_HANDLER_TIMEOUT for a thread and was not run."""

    def __init__(self, seconds: float, stuck: int) -> None:
        self.seconds = seconds
        self.stuck = stuck
        super().__init__(
            f"no free handler thread within {seconds:g}s ({stuck} held by timed-out "
            "handlers): not run, retried later"
        )


class ResultTooLarge(RunnerError):
    """What the handler produced cannot travel over gRPC to the sidecar."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"{what} is {size} bytes, over the {limit} byte gRPC limit (KRT_GRPC_MAX_MESSAGE_BYTES)"
        )


@dataclass(slots=True)
class _Span:
    """When the user code was entered and when it returned (or raised); 0 until set."""

    start: int = 0
    end: int = 0


class Dispatcher:
    """Calls the user's ``init`` and ``handler`` with the right ctx, in the right place."""

    def __init__(
        self,
        user_code: UserCode,
        context: Context,
        executor: Executor,
        *,
        timeout: float = 0.0,
        max_message_bytes: int = 0,
        threads: int | None = None,
    ) -> None:
        self.user_code = user_code
        self.context = context
        self.timeout = timeout  # KRT_HANDLER_TIMEOUT; 0: no limit
        self._executor = executor
        self._max_message_bytes = max_message_bytes  # 0: not checked
        self._threads = threads
        self._handler_is_async = is_async_callable(user_code.handler)
        self._sync_calls: set[concurrent.futures.Future[Any]] = set()
        self._stuck: set[concurrent.futures.Future[Any]] = set()

    @property
    def sync_calls_pending(self) -> int:
        """Sync user calls queued or running in the thread pool (they cannot be cancelled)."""
        return len(self._sync_calls)

    @property
    def stuck_threads(self) -> int:
        """Threads still running a sync handler that timed out."""
        return len(self._stuck)

    async def run_init(self) -> None:
        """Run ``init(ctx)`` with the shared Context; raise InitError if it raises."""
        init = self.user_code.init
        if init is None:
            logger.info("no init(ctx) in %s", self.user_code.path)
            return
        logger.info("running init(ctx)")
        try:
            await self._call(init, (self.context,), is_async_callable(init), _Span())
        except (Exception, SystemExit) as exc:
            raise InitError(self.user_code.path, exc) from exc
        logger.info("init(ctx) finished")

    async def dispatch(
        self, delivery: runner_pb2.Delivery, emit_early: EmitEarly
    ) -> runner_pb2.Result:
        """Run the handler for one delivery; never raises (except when itself cancelled)."""
        message = delivery.message
        ctx = self.context.for_message(
            message.tracking_id, replied=message.replied, emit_early=self._bounded(emit_early)
        )
        span = _Span()
        try:
            value = await self._call(
                self.user_code.handler,
                (ctx, message.payload),
                self._handler_is_async,
                span,
                self.timeout,
            )
            result = self._result_of(value)
        except asyncio.CancelledError as exc:
            if _being_cancelled():
                raise
            result = self._failed(delivery, exc)  # raised by the handler, not a cancellation
        except BaseException as exc:  # every ending becomes one Result
            result = self._failed(delivery, exc)
        finally:
            ctx.finish()
        if ctx.exited_early:
            result.early_exit = True
        _stamp(result, span)
        return result

    def _bounded(self, emit_early: EmitEarly) -> EmitEarly:
        limit = self._max_message_bytes

        async def emit(payload: any_pb2.Any) -> None:
            size = payload.ByteSize() + EVENT_ROOM
            if limit and size > limit:
                raise EarlyReplyError(str(ResultTooLarge("the early reply", size, limit)))
            await emit_early(payload)

        return emit

    def _result_of(self, value: object) -> runner_pb2.Result:
        result = _result_of(value)
        size = result.ByteSize() + EVENT_ROOM
        if self._max_message_bytes and size > self._max_message_bytes:
            raise ResultTooLarge("the handler's result", size, self._max_message_bytes)
        return result

    def _failed(self, delivery: runner_pb2.Delivery, exc: BaseException) -> runner_pb2.Result:
        where = (delivery.id, delivery.message.tracking_id)
        if isinstance(exc, HandlerTimeout | NoFreeHandlerThread):
            stuck = f"; {self.stuck_threads} sync handler thread(s) busy with timed-out calls"
            logger.error(
                "%s on delivery %d, tracking_id=%s%s", exc, *where, stuck if self._stuck else ""
            )
            return runner_pb2.Result(failure=failure_of(exc))
        return _failed(delivery, exc)

    async def _call(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        is_async: bool,
        span: _Span,
        timeout: float = 0.0,
    ) -> Any:
        if is_async:
            span.start = _now()
            try:
                return await _call_async(fn, args, timeout)
            finally:
                span.end = _now()
        value = await self._run_in_thread(fn, args, span, timeout)
        if inspect.isawaitable(value):
            # A sync-looking callable that returned a coroutine (a decorator that hid
            # ``async def``): finish it on the loop.
            value = await _call_async(lambda: value, (), timeout)
            span.end = _now()
        return value

    async def _run_in_thread(
        self, fn: Callable[..., Any], args: tuple[Any, ...], span: _Span, timeout: float
    ) -> Any:
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        def run() -> Any:
            _threadsafe(loop, started.set)
            return _call_sync(fn, args, span)

        # In a copy of this task's context: the delivery's log tags reach the thread too.
        work = self._executor.submit(contextvars.copy_context().run, run)
        # Before wrap_future's own callback: the count is right when the await returns.
        self._sync_calls.add(work)
        work.add_done_callback(self._sync_calls.discard)
        done = asyncio.wrap_future(work, loop=loop)
        if not timeout:
            return await done
        try:
            if not await _wait_event(started, timeout) and work.cancel():
                raise NoFreeHandlerThread(timeout, self.stuck_threads)
            finished, _ = await asyncio.wait({done}, timeout=timeout)
        except asyncio.CancelledError:
            done.cancel()  # withdraws it from the pool if it has not started
            raise
        if not finished:
            self._hold(work, loop)
            raise HandlerTimeout(timeout)
        return done.result()

    def _hold(self, work: concurrent.futures.Future[Any], loop: asyncio.AbstractEventLoop) -> None:
        """Count a thread held by a timed-out sync handler until the handler returns."""
        self._stuck.add(work)
        since = time.monotonic()
        logger.error(
            "a sync handler timed out after %gs; Python cannot stop a thread, so it stays "
            "busy until the handler returns (%d of %s handler thread(s) held)",
            self.timeout,
            len(self._stuck),
            self._threads or "?",
        )
        if self._threads is not None and len(self._stuck) >= self._threads:
            logger.error(
                "every handler thread (KRT_HANDLER_THREADS=%d) is held by a timed-out handler: "
                "sync messages wait for a thread and are retried after KRT_HANDLER_TIMEOUT; "
                "restart the handler host if this lasts",
                self._threads,
            )

        def released(_: concurrent.futures.Future[Any]) -> None:
            self._stuck.discard(work)
            logger.warning(
                "a timed-out sync handler returned after %.1fs: its thread is free again",
                time.monotonic() - since,
            )

        work.add_done_callback(lambda f: _threadsafe(loop, released, f))


async def _call_async(fn: Callable[..., Any], args: tuple[Any, ...], timeout: float) -> Any:
    if not timeout:
        return await fn(*args)
    task = asyncio.ensure_future(fn(*args))
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


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("a timed-out handler raised after its timeout: %r", task.exception())


async def _wait_event(event: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return event.is_set()
    return True


def _threadsafe(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: the host is exiting
        pass


def _call_sync(fn: Callable[..., Any], args: tuple[Any, ...], span: _Span) -> Any:
    span.start = _now()
    try:
        return fn(*args)
    finally:
        span.end = _now()


def _result_of(value: object) -> runner_pb2.Result:
    result = runner_pb2.Result()
    if value is None:
        return result
    if not isinstance(value, Message):
        raise InvalidHandlerResult(value)
    # As pack_any, straight into the Result: no Any built and then copied.
    if isinstance(value, any_pb2.Any):
        result.payload.CopyFrom(value)
    else:
        result.payload.Pack(value)
    return result


def _failed(delivery: runner_pb2.Delivery, exc: BaseException) -> runner_pb2.Result:
    failure = failure_of(exc)
    where = (failure.type, delivery.id, delivery.message.tracking_id)
    if failure.retryable:
        logger.info("handler asked for a retry (%s) on delivery %d, tracking_id=%s", *where)
    else:
        logger.error(
            "handler raised %s on delivery %d, tracking_id=%s\n%s", *where, failure.traceback
        )
    return runner_pb2.Result(failure=failure)


def failure_of(exc: BaseException) -> runner_pb2.Failure:
    """The Failure for ``exc``; built even when the exception cannot be printed."""
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not lose the Result
        message = f"<{type(exc).__name__} whose str() raised>"
    try:
        trace = format_user_traceback(exc)
    except Exception:
        trace = ""
    return runner_pb2.Failure(
        message=_bounded(message, MAX_FAILURE_MESSAGE_CHARS, keep_end=False),
        type=_text(type(exc).__name__),
        retryable=isinstance(exc, RetryableError),
        traceback=_bounded(trace, MAX_TRACEBACK_CHARS, keep_end=True),
    )


def _bounded(text: str, limit: int, *, keep_end: bool) -> str:
    text = _text(text)
    if len(text) <= limit:
        return text
    if keep_end:  # the end of a traceback is where the error is
        return "...(truncated)\n" + text[-limit:]
    return text[:limit] + "...(truncated)"


def _text(text: str) -> str:
    # Protobuf strings must be valid UTF-8; a lone surrogate in a message is not.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _stamp(result: runner_pb2.Result, span: _Span) -> None:
    end = span.end or _now()
    _set(result.start, span.start or end)
    _set(result.end, end)


def _set(stamp: timestamp_pb2.Timestamp, nanos: int) -> None:
    # Timestamp.FromNanoseconds without its range check (a clock reading is in range);
    # FromDatetime goes through calendar.timegm, five times slower.
    stamp.seconds, stamp.nanos = divmod(nanos, 1_000_000_000)


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _now() -> int:
    """Wall-clock nanoseconds since the epoch, in whole microseconds.

    Microseconds: what a datetime holds, and the sidecar's tracking entries and the
    InfluxDB timing are datetimes; a Result's stamps keep six fractional digits.
    """
    return time.time_ns() // 1000 * 1000
