"""Threads that watch the host from outside its event loop.

``LoopWatchdog``: an async handler that blocks the event loop (``time.sleep``, CPU-bound
code) stops every other delivery, the health service and the stream with it, and no
timeout on the loop can fire: ``KRT_HANDLER_TIMEOUT`` cancels a task only when the loop
turns. A thread sees the loop not turning for ``STALL_SECONDS`` and logs which delivery
is running (tracking id, stream sequence) and which others are in flight, then logs
again when the loop turns. The sidecar, which gets no Result in time, treats the
messages in flight as suspects and tries each alone (``sidecar.isolation``).

``InitProgress``: a long ``init(ctx)`` (a model download, say) logs that it is still
running every ``INIT_PROGRESS_EVERY`` seconds, even when it blocks the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType

logger = logging.getLogger(__name__)

STALL_SECONDS = 5.0  # the loop not turning for this long is reported
CHECK_EVERY = 0.5
INIT_PROGRESS_EVERY = 30.0


@dataclass(frozen=True, slots=True)
class Running:
    """A delivery in the handler: what a log line names it by."""

    delivery_id: int
    stream_sequence: int
    tracking_id: str
    since: float  # time.monotonic()

    def describe(self, now: float) -> str:
        return (
            f"delivery {self.delivery_id} (stream seq {self.stream_sequence}, tracking id "
            f"{self.tracking_id or '-'}, running {now - self.since:.0f}s)"
        )


class LoopWatchdog:
    """Reports an event loop that stops turning; a daemon thread that ends with the loop.

    ``running`` maps the tasks that run user code to their delivery; it is read from
    the thread only while the loop is stuck (so nothing changes it meanwhile).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        running: Mapping[asyncio.Future[object], Running],
        stall_seconds: float = STALL_SECONDS,
        check_every: float = CHECK_EVERY,
    ) -> None:
        self._loop = loop
        self._running = running
        self._stall = stall_seconds
        self._every = check_every
        self._beat = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)

    def start(self) -> LoopWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _turned(self) -> None:
        self._beat = time.monotonic()

    def _watch(self) -> None:
        stalled_since: float | None = None
        while not self._stop.wait(self._every):
            if self._loop.is_closed():
                return
            if not self._loop.is_running():
                continue
            now = time.monotonic()
            silent = now - self._beat
            if silent >= self._stall and stalled_since is None:
                stalled_since = self._beat
                self._report(now, silent)
            elif silent < self._every * 2 and stalled_since is not None:
                logger.warning(
                    "the event loop turns again, after %.1fs", self._beat - stalled_since
                )
                stalled_since = None
            try:
                self._loop.call_soon_threadsafe(self._turned)
            except RuntimeError:  # closed: the host is exiting
                return

    def _report(self, now: float, silent: float) -> None:
        current = asyncio.current_task(self._loop)
        try:
            running = dict(self._running)
        except RuntimeError:  # changed while copied: the loop turned after all
            return
        culprit = running.get(current) if current is not None else None
        others = sorted({r.describe(now) for task, r in running.items() if r is not culprit})
        if culprit is not None:
            what = f"the handler of {culprit.describe(now)} is blocking it"
        else:
            what = "code that is not a handler's (or a handler's thread) is blocking it"
        logger.error(
            "the event loop has not turned for %.0fs: %s (time.sleep or CPU-bound work in "
            "an async handler: use await asyncio.sleep, asyncio.to_thread, or a sync "
            "handler); KRT_HANDLER_TIMEOUT cannot fire until it returns; %d other "
            "deliveries are stalled with it%s",
            silent,
            what,
            len(others),
            (": " + ", ".join(others[:10])) if others else "",
        )


class InitProgress:
    """``with InitProgress():`` around init(ctx): a line every INIT_PROGRESS_EVERY seconds."""

    def __init__(
        self, every: float | None = None, log: Callable[[str, float], None] | None = None
    ) -> None:
        self._every = INIT_PROGRESS_EVERY if every is None else every
        self._log = log or (lambda text, s: logger.info(text, s))
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._tell, name="init-progress", daemon=True)

    def __enter__(self) -> InitProgress:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()

    def _tell(self) -> None:
        while not self._done.wait(self._every):
            self._log("init(ctx) still running after %.0fs", time.monotonic() - self._started)
