"""Run user code: ``init(ctx)`` once, ``handler(ctx, data)`` per delivery.

``Dispatcher.dispatch`` is the one place both RPCs (Process and Handle) go through,
and it always returns exactly one ``Result``, whatever the handler does (as
Temporal's activity worker always builds exactly one completion).

Async handlers run on the event loop, as many at once as there are deliveries in
flight. Sync handlers run in a thread pool of ``KRT_HANDLER_THREADS`` threads
(default 1, so a model that is not thread-safe, a GPU model typically, is never
entered twice at once). ``ctx.early_reply`` is a coroutine, so only async handlers
can use it; from a sync handler it raises EarlyReplyError.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import Message

from handler_host.context import Context, EmitEarly, pack_any
from handler_host.errors import (
    InitError,
    InvalidHandlerResult,
    RetryableError,
    format_user_traceback,
)
from handler_host.loader import UserCode, is_async_callable
from protos import runner_pb2

logger = logging.getLogger(__name__)

# A failure travels inside a NATS message: keep the text bounded.
MAX_FAILURE_MESSAGE_CHARS = 16 * 1024
MAX_TRACEBACK_CHARS = 32 * 1024


@dataclass
class _Span:
    """When the user code was entered and when it returned (or raised)."""

    start: datetime | None = None
    end: datetime | None = None


class Dispatcher:
    """Calls the user's ``init`` and ``handler`` with the right ctx, in the right place."""

    def __init__(self, user_code: UserCode, context: Context, executor: Executor) -> None:
        self.user_code = user_code
        self.context = context
        self._executor = executor
        self._handler_is_async = is_async_callable(user_code.handler)
        self._sync_calls = 0

    @property
    def sync_calls_pending(self) -> int:
        """Sync user calls queued or running in the thread pool (they cannot be cancelled)."""
        return self._sync_calls

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
            message.tracking_id, replied=message.replied, emit_early=emit_early
        )
        span = _Span()
        try:
            value = await self._call(
                self.user_code.handler, (ctx, message.payload), self._handler_is_async, span
            )
            result = _result_of(value)
        except asyncio.CancelledError as exc:
            if _being_cancelled():
                raise
            result = _failed(delivery, exc)  # raised by the handler, not a cancellation of ours
        except BaseException as exc:  # every ending becomes one Result
            result = _failed(delivery, exc)
        finally:
            ctx.finish()
        _stamp(result, span)
        return result

    async def _call(
        self, fn: Callable[..., Any], args: tuple[Any, ...], is_async: bool, span: _Span
    ) -> Any:
        if is_async:
            span.start = _now()
            try:
                return await fn(*args)
            finally:
                span.end = _now()
        self._sync_calls += 1
        try:
            loop = asyncio.get_running_loop()
            value = await loop.run_in_executor(self._executor, _call_sync, fn, args, span)
        finally:
            self._sync_calls -= 1
        if inspect.isawaitable(value):
            # A sync-looking callable that returned a coroutine (a decorator that hid
            # ``async def``): finish it on the loop.
            value = await value
            span.end = _now()
        return value


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
    result.payload.CopyFrom(pack_any(value))
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
    result.start.FromDatetime(span.start or end)
    result.end.FromDatetime(end)


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _now() -> datetime:
    return datetime.now(UTC)
