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

An async handler that blocks the event loop (``time.sleep``) cannot be timed out: no
timer fires until it returns. ``handler_host.watchdog`` reports it, naming the delivery.
A ``sys.exit()``, KeyboardInterrupt or other BaseException from user code, sync or
async, with or without a timeout, is the delivery's Failure ("the handler called
sys.exit(3)"); it never ends the host. Only ``os._exit`` (or a crash in native code)
does: the sidecar then finds the message that did it (``sidecar.isolation``).

A Result or early reply larger than ``KRT_GRPC_MAX_MESSAGE_BYTES`` would break the
stream every message shares; it becomes a failure instead.

Each delivery runs inside its log tags (``handler_host.logs.bind``). The Dispatcher's
``DispatchObserver``s are told when ``init`` has run and when a delivery starts, sends
an early reply and finishes: ``handler_host.server.start_server`` plugs in the metrics
(``handler_host.metrics``) and KRE's timing measurements (``handler_host.timing``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

from google.protobuf import any_pb2
from google.protobuf.message import Message

from handler_host.calling import (
    Span,
    being_cancelled,
    call_async,
    call_sync,
    clock,
    now,
    stamp,
    threadsafe,
    wait_event,
)
from handler_host.context import Context, EmitEarly
from handler_host.errors import (
    EarlyReplyError,
    HandlerTimeout,
    InitError,
    InvalidHandlerResult,
    NoFreeHandlerThread,
    ResultTooLarge,
    UserExit,
    failure_of,
    is_user_exit,
    what_it_did,
)
from handler_host.loader import UserCode, is_async_callable
from handler_host.logs import DeliveryTags, bind
from handler_host.watchdog import InitProgress, LoopWatchdog, Running
from protos import runner_pb2

logger = logging.getLogger(__name__)

# An Event's delivery id and framing, on top of the Result or early reply in it.
EVENT_ROOM = 32


class DispatchObserver:
    """Told what happens to each delivery, to measure it; here every hook does nothing.

    An observer overrides the hooks it needs. They run on the event loop, inside the
    delivery's log tags, and must not raise: the delivery's Result would be lost.
    """

    def init_finished(self, seconds: float) -> None:
        """``init(ctx)`` returned (or the module has none) after ``seconds``."""

    def started(self, delivery: runner_pb2.Delivery) -> None:
        """The delivery is about to be handled (a sync one may still wait for a thread)."""

    def early_reply_sent(self) -> None:
        """The handler's ``ctx.early_reply`` went to the stream."""

    def finished(self, delivery: runner_pb2.Delivery, result: runner_pb2.Result | None) -> None:
        """The delivery's Result, final and stamped; None when the delivery was cancelled."""


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
        observers: Sequence[DispatchObserver] = (),
    ) -> None:
        self.user_code = user_code
        self.context = context
        self.timeout = timeout  # KRT_HANDLER_TIMEOUT; 0: no limit
        self._executor = executor
        self._max_message_bytes = max_message_bytes  # 0: not checked
        self._threads = threads
        self._observers = tuple(observers)
        self._handler_is_async = is_async_callable(user_code.handler)
        self._sync_calls: set[concurrent.futures.Future[Any]] = set()
        self._stuck: set[concurrent.futures.Future[Any]] = set()
        # The tasks running an async handler, for the watchdog to name a blocking one.
        self._running: dict[asyncio.Future[Any], Running] = {}
        self._watchdog: LoopWatchdog | None = None

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
        started = time.perf_counter()
        init = self.user_code.init
        if init is None:
            logger.info("no init(ctx) in %s", self.user_code.path)
        else:
            logger.info("running init(ctx)")
            try:
                with InitProgress():
                    await self._call(init, (self.context,), is_async_callable(init), Span())
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # sys.exit() and KeyboardInterrupt too: one clear line
                cause = exc.cause if isinstance(exc, UserExit) else exc
                raise InitError(self.user_code.path, cause) from exc
            logger.info("init(ctx) finished")
        if self._watchdog is None:
            self._watchdog = LoopWatchdog(asyncio.get_running_loop(), self._running).start()
        seconds = time.perf_counter() - started
        for observer in self._observers:
            observer.init_finished(seconds)

    async def dispatch(
        self, delivery: runner_pb2.Delivery, emit_early: EmitEarly
    ) -> runner_pb2.Result:
        """Run the handler for one delivery; never raises (except when itself cancelled)."""
        with bind(DeliveryTags(self.context.node_name, delivery)):
            for observer in self._observers:
                observer.started(delivery)
            result = None
            try:
                result = await self._handle(delivery, emit_early)
            finally:
                for observer in self._observers:
                    observer.finished(delivery, result)
        return result

    async def _handle(
        self, delivery: runner_pb2.Delivery, emit_early: EmitEarly
    ) -> runner_pb2.Result:
        message = delivery.message
        ctx = self.context.for_message(
            message.tracking_id,
            replied=message.replied,
            emit_early=self._early_reply_sender(emit_early),
        )
        span = Span()
        task = asyncio.current_task()
        running = Running(delivery.id, delivery.stream_sequence, message.tracking_id, clock())
        if task is not None and self._handler_is_async:
            self._running[task] = running
        try:
            value = await self._call(
                self.user_code.handler,
                (ctx, message.payload),
                self._handler_is_async,
                span,
                self.timeout,
                running,
            )
            result = self._packed_result(value)
        except asyncio.CancelledError as exc:
            if being_cancelled():
                raise
            result = self._failure_result(delivery, exc)  # raised by the handler itself
        except BaseException as exc:  # every ending becomes one Result
            result = self._failure_result(delivery, exc)
        finally:
            ctx.finish()
            self._running.pop(task, None)  # type: ignore[arg-type]
        if ctx.exited_early:
            result.early_exit = True
        stamp(result, span)
        return result

    def _early_reply_sender(self, emit_early: EmitEarly) -> EmitEarly:
        """``emit_early`` refusing a reply too big for the stream, and telling the observers."""
        limit = self._max_message_bytes
        observers = self._observers

        async def send(payload: any_pb2.Any) -> None:
            size = payload.ByteSize() + EVENT_ROOM
            if limit and size > limit:
                raise EarlyReplyError(str(ResultTooLarge("the early reply", size, limit)))
            await emit_early(payload)
            for observer in observers:
                observer.early_reply_sent()

        return send

    def _packed_result(self, value: object) -> runner_pb2.Result:
        """The Result carrying what the handler returned; raises if it cannot travel."""
        result = runner_pb2.Result()
        if isinstance(value, any_pb2.Any):
            result.payload.CopyFrom(value)
        elif isinstance(value, Message):
            # As pack_any, straight into the Result: no Any built and then copied.
            result.payload.Pack(value)
        elif value is not None:
            raise InvalidHandlerResult(value)
        size = result.ByteSize() + EVENT_ROOM
        if self._max_message_bytes and size > self._max_message_bytes:
            raise ResultTooLarge("the handler's result", size, self._max_message_bytes)
        return result

    def _failure_result(
        self, delivery: runner_pb2.Delivery, exc: BaseException
    ) -> runner_pb2.Result:
        """The Result for a handler that raised or timed out, logged."""
        failure = failure_of(exc)
        where = (delivery.id, delivery.stream_sequence, delivery.message.tracking_id)
        if is_user_exit(exc):
            cause = exc.cause if isinstance(exc, UserExit) else exc
            logger.error(
                "the handler %s on delivery %d (stream seq %d, tracking_id=%s): the message "
                "fails, the host carries on",
                what_it_did(cause),
                *where,
            )
        elif isinstance(exc, HandlerTimeout | NoFreeHandlerThread):
            stuck = f"; {self.stuck_threads} sync handler thread(s) busy with timed-out calls"
            logger.error(
                "%s on delivery %d (stream seq %d, tracking_id=%s)%s",
                exc,
                *where,
                stuck if self._stuck else "",
            )
        elif failure.retryable:
            logger.info(
                "handler asked for a retry (%s) on delivery %d (stream seq %d, tracking_id=%s)",
                failure.type,
                *where,
            )
        else:
            logger.error(
                "handler raised %s on delivery %d (stream seq %d, tracking_id=%s)\n%s",
                failure.type,
                *where,
                failure.traceback,
            )
        return runner_pb2.Result(failure=failure)

    async def _call(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        is_async: bool,
        span: Span,
        timeout: float = 0.0,
        running: Running | None = None,
    ) -> Any:
        track = None if running is None else functools.partial(self._track, running)
        if is_async:
            span.start = now()
            try:
                return await call_async(fn, args, timeout, track)
            finally:
                span.end = now()
        value = await self._run_in_thread(fn, args, span, timeout)
        if inspect.isawaitable(value):
            # A sync-looking callable that returned a coroutine (a decorator that hid
            # ``async def``): finish it on the loop.
            value = await call_async(lambda: value, (), timeout, track)
            span.end = now()
        return value

    async def _run_in_thread(
        self, fn: Callable[..., Any], args: tuple[Any, ...], span: Span, timeout: float
    ) -> Any:
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        def run() -> Any:
            threadsafe(loop, started.set)
            return call_sync(fn, args, span)

        # In a copy of this task's context: the delivery's log tags reach the thread too.
        work = self._executor.submit(contextvars.copy_context().run, run)
        # Before wrap_future's own callback: the count is right when the await returns.
        self._sync_calls.add(work)
        work.add_done_callback(self._sync_calls.discard)
        done = asyncio.wrap_future(work, loop=loop)
        if not timeout:
            return await done
        try:
            if not await wait_event(started, timeout) and work.cancel():
                raise NoFreeHandlerThread(timeout, self.stuck_threads)
            finished, _ = await asyncio.wait({done}, timeout=timeout)
        except asyncio.CancelledError:
            done.cancel()  # withdraws it from the pool if it has not started
            raise
        if not finished:
            self._hold(work, loop)
            raise HandlerTimeout(timeout)
        return done.result()

    def _track(self, running: Running, task: asyncio.Future[Any]) -> None:
        """The task now running a delivery's handler, for the watchdog, until it ends."""
        self._running[task] = running
        task.add_done_callback(self._untrack)

    def _untrack(self, task: asyncio.Future[Any]) -> None:
        self._running.pop(task, None)

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

        work.add_done_callback(lambda f: threadsafe(loop, released, f))
