"""The background writer behind ``ctx.measurement``: a bounded queue and one thread.

``submit`` is what the handler's call costs: a lock, an append, a counter. It never
waits for the network. One daemon thread takes up to ``batch_size`` lines at a time
(or whatever is queued after ``flush_interval_s``) and hands them to ``send``, one
call per precision. When the queue is full the oldest line is dropped and counted;
when ``send`` raises, the batch is counted as failed (no retries) and the next write
waits one interval. Losses are logged at most once per ``report_interval_s``, never
once per point.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# send(precision, lines): write the lines to the server, raise on any failure.
Send = Callable[[str, list[str]], None]


@dataclass(frozen=True)
class WriterStats:
    """Counts of points since the writer started (a snapshot)."""

    accepted: int  # taken by submit()
    written: int  # acknowledged by the server
    dropped: int  # evicted because the queue was full, or submitted after close()
    failed: int  # lost because a write failed
    failed_writes: int  # write requests that failed
    queued: int  # waiting in the queue now

    @property
    def lost(self) -> int:
        return self.dropped + self.failed


class BatchWriter:
    """Writes lines in the background; see the module docstring."""

    def __init__(
        self,
        send: Send,
        *,
        where: str = "InfluxDB",
        queue_size: int = 10_000,
        batch_size: int = 1_000,
        flush_interval_s: float = 1.0,
        report_interval_s: float = 30.0,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        if queue_size < 1 or batch_size < 1:
            raise ValueError("queue_size and batch_size must be >= 1")
        self._send = send
        self._where = where
        self._queue_size = queue_size
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._on_close = on_close
        self._cond = threading.Condition()
        self._queue: deque[tuple[str, str]] = deque()
        self._accepted = self._written = self._failed = self._failed_writes = 0
        self._evicted = 0  # accepted, then pushed out of a full queue
        self._refused = 0  # submitted after close()
        self._flush_wanted = False
        self._closing = False
        self._closed = False
        self._reporter = _LossReporter(where, report_interval_s)
        self._thread = threading.Thread(target=self._run, name="influx-writer", daemon=True)
        self._thread.start()

    def submit(self, precision: str, line: str) -> None:
        """Queue one line; returns at once whatever the server is doing."""
        with self._cond:
            if self._closing:
                self._refused += 1
                return
            if len(self._queue) >= self._queue_size:
                self._queue.popleft()
                self._evicted += 1
            self._queue.append((precision, line))
            self._accepted += 1
            if len(self._queue) == self._batch_size:
                self._cond.notify_all()

    @property
    def stats(self) -> WriterStats:
        with self._cond:
            return self._stats_locked()

    def flush(self, timeout_s: float) -> bool:
        """Send what is queued now; True once every line submitted so far is written,
        failed or dropped, False if that takes longer than ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            target = self._accepted
            self._flush_wanted = True
            self._cond.notify_all()
            while self._handled_locked() < target:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout_s: float) -> None:
        """Send what is queued (give up after ``timeout_s``), stop the thread, log totals."""
        with self._cond:
            if self._closed:
                return
            self._closed = self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        stats = self.stats
        if self._thread.is_alive():
            logger.warning(
                "%s: writer still busy after %g s at shutdown; %d points not written",
                self._where,
                timeout_s,
                stats.queued,
            )
        logger.info(
            "%s: writer closed: %d points written, %d failed, %d dropped",
            self._where,
            stats.written,
            stats.failed,
            stats.dropped,
        )
        if self._on_close is not None:
            self._on_close()

    # The writer thread.

    def _run(self) -> None:
        while True:
            batch, closing = self._next_batch()
            ok = self._write(batch) if batch else True
            self._reporter.maybe_report(self.stats)
            if closing and (not batch or not ok):
                # At shutdown one failure is enough: do not wait for a timeout per batch.
                self._fail_rest()
                return
            if not ok:
                self._back_off()

    def _next_batch(self) -> tuple[list[tuple[str, str]], bool]:
        with self._cond:
            if not (self._closing or self._flush_wanted or len(self._queue) >= self._batch_size):
                self._cond.wait(self._flush_interval_s)
            count = min(len(self._queue), self._batch_size)
            batch = [self._queue.popleft() for _ in range(count)]
            if not self._queue:
                self._flush_wanted = False
            return batch, self._closing

    def _back_off(self) -> None:
        # After a failure, wait one interval before the next write instead of trying
        # every full batch at once: a down server is not hammered, no CPU is burnt.
        with self._cond:
            if not (self._closing or self._flush_wanted):
                self._cond.wait(self._flush_interval_s)

    def _write(self, batch: list[tuple[str, str]]) -> bool:
        by_precision: dict[str, list[str]] = {}
        for precision, line in batch:
            by_precision.setdefault(precision, []).append(line)
        ok = True
        for precision, lines in by_precision.items():
            try:
                self._send(precision, lines)
            except Exception as err:  # any failure of the server or the network
                ok = False
                self._reporter.note_error(err)
                self._count(failed=len(lines), failed_writes=1)
            else:
                # Noted before counted: flush() returns once the count is in, and what
                # the write logs ("writes succeed again") is in the log by then.
                self._reporter.note_success()
                self._count(written=len(lines))
        return ok

    def _fail_rest(self) -> None:
        with self._cond:
            rest = len(self._queue)
            self._queue.clear()
            self._failed += rest
            self._cond.notify_all()

    def _count(self, written: int = 0, failed: int = 0, failed_writes: int = 0) -> None:
        with self._cond:
            self._written += written
            self._failed += failed
            self._failed_writes += failed_writes
            self._cond.notify_all()

    def _handled_locked(self) -> int:
        return self._written + self._failed + self._evicted

    def _stats_locked(self) -> WriterStats:
        return WriterStats(
            accepted=self._accepted,
            written=self._written,
            dropped=self._evicted + self._refused,
            failed=self._failed,
            failed_writes=self._failed_writes,
            queued=len(self._queue),
        )


class _LossReporter:
    """Logs lost points at most once per interval, and once when writes succeed again."""

    def __init__(self, where: str, interval_s: float) -> None:
        self._where = where
        self._interval_s = interval_s
        self._last_at = float("-inf")
        self._lost_reported = 0
        self._last_error = "none"
        self._warned = False

    def note_error(self, err: Exception) -> None:
        self._last_error = f"{type(err).__name__}: {err}"[:300]

    def note_success(self) -> None:
        if self._warned:
            self._warned = False
            logger.info("%s: writes succeed again", self._where)

    def maybe_report(self, stats: WriterStats) -> None:
        lost = stats.lost - self._lost_reported
        now = time.monotonic()
        if lost <= 0 or now - self._last_at < self._interval_s:
            return
        logger.warning(
            "%s: %d points lost since the last report (%d in all: %d in %d failed writes, "
            "%d dropped from a full queue); last error: %s",
            self._where,
            lost,
            stats.lost,
            stats.failed,
            stats.failed_writes,
            stats.dropped,
            self._last_error,
        )
        self._last_at = now
        self._lost_reported = stats.lost
        self._warned = True
