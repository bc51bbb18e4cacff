"""The background writer behind ctx.measurement, with a fake ``send`` (no network)."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from handler_host.services.influx_writer import BatchWriter


class FakeSend:
    """Records batches; ``gate`` holds every send until set; ``fail`` makes them raise."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[str]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail: Exception | None = None
        self.entered = threading.Event()

    def __call__(self, precision: str, lines: list[str]) -> None:
        self.entered.set()
        self.gate.wait()
        if self.fail is not None:
            raise self.fail
        self.batches.append((precision, list(lines)))


def test_lines_are_batched_by_precision_in_order() -> None:
    send = FakeSend()
    writer = BatchWriter(send, batch_size=100, flush_interval_s=60)
    for i in range(3):
        writer.submit("ns", f"a{i}")
        writer.submit("s", f"b{i}")
    assert writer.flush(5)
    assert send.batches == [("ns", ["a0", "a1", "a2"]), ("s", ["b0", "b1", "b2"])]
    stats = writer.stats
    assert (stats.accepted, stats.written, stats.queued, stats.lost) == (6, 6, 0, 0)
    writer.close(5)


def test_a_full_batch_is_sent_without_waiting_for_the_interval() -> None:
    send = FakeSend()
    writer = BatchWriter(send, batch_size=10, flush_interval_s=60)
    for i in range(10):
        writer.submit("ns", str(i))
    deadline = time.monotonic() + 5
    while writer.stats.written < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer.stats.written == 10
    writer.close(5)


def test_a_full_queue_drops_the_oldest_and_counts_them() -> None:
    send = FakeSend()
    send.gate.clear()  # the server hangs: the writer holds its first batch
    writer = BatchWriter(send, queue_size=5, batch_size=1, flush_interval_s=0.01)
    writer.submit("ns", "first")
    assert send.entered.wait(5)
    started = time.monotonic()
    for i in range(100):
        writer.submit("ns", f"l{i}")
    assert time.monotonic() - started < 0.5  # submit never waits for the writer
    assert writer.stats.dropped == 95 and writer.stats.queued == 5
    send.gate.set()
    assert writer.flush(5)
    assert [lines for _, lines in send.batches] == [["first"]] + [[f"l{i}"] for i in range(95, 100)]
    writer.close(5)


def test_failures_are_counted_and_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="handler_host.services.influx_writer")
    send = FakeSend()
    send.fail = ConnectionRefusedError("refused")
    writer = BatchWriter(send, batch_size=2, flush_interval_s=0.01, report_interval_s=3600)
    for i in range(20):
        writer.submit("ns", f"l{i}")
        assert writer.flush(5)
    stats = writer.stats
    assert (stats.written, stats.failed, stats.failed_writes) == (0, 20, 20)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "ConnectionRefusedError: refused" in warnings[0].getMessage()
    send.fail = None
    writer.submit("ns", "back")
    assert writer.flush(5)
    assert any("succeed again" in r.getMessage() for r in caplog.records)
    writer.close(5)


class SlowHandler(logging.Handler):
    """Takes `delay` to emit each record, then keeps it: a slow log sink."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        time.sleep(self.delay)
        self.messages.append(record.getMessage())


def test_flush_returns_after_the_recovery_is_logged() -> None:
    # flush() once returned as soon as the good write was counted, while the writer
    # thread had yet to log "writes succeed again": a reader of the log right after
    # the flush (this module's other tests) could miss it.
    logger = logging.getLogger("handler_host.services.influx_writer")
    slow = SlowHandler(delay=0.2)
    logger.addHandler(slow)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        send = FakeSend()
        send.fail = ConnectionRefusedError("refused")
        writer = BatchWriter(send, batch_size=1, flush_interval_s=0.01, report_interval_s=0)
        writer.submit("ns", "lost")
        assert writer.flush(5)
        send.fail = None
        writer.submit("ns", "back")
        assert writer.flush(5)
        assert any("succeed again" in m for m in slow.messages), slow.messages
        writer.close(5)
    finally:
        logger.removeHandler(slow)
        logger.setLevel(level)


def test_after_a_failure_the_next_write_waits_an_interval() -> None:
    send = FakeSend()
    send.fail = ConnectionRefusedError("refused")
    writer = BatchWriter(send, batch_size=1, flush_interval_s=0.3)
    started = time.monotonic()
    for i in range(50):
        writer.submit("ns", str(i))
    while writer.stats.failed_writes < 2 and time.monotonic() - started < 5:
        time.sleep(0.01)
    elapsed = time.monotonic() - started
    # Full batches are queued, yet the second try waits for the interval.
    assert 2 <= writer.stats.failed_writes <= 3 and elapsed >= 0.25
    writer.close(5)


def test_close_sends_what_is_queued() -> None:
    send = FakeSend()
    writer = BatchWriter(send, batch_size=1000, flush_interval_s=60)
    writer.submit("ns", "a")
    writer.submit("ns", "b")
    writer.close(5)
    assert send.batches == [("ns", ["a", "b"])]
    writer.submit("ns", "late")  # after close: refused, counted, no error
    assert writer.stats.dropped == 1 and writer.stats.written == 2


def test_close_gives_up_after_the_first_failure() -> None:
    send = FakeSend()
    send.gate.clear()
    writer = BatchWriter(send, batch_size=1, flush_interval_s=60)
    writer.submit("ns", "first")
    assert send.entered.wait(5)  # the writer holds "first" at the gate
    for i in range(10):
        writer.submit("ns", str(i))
    send.fail = ConnectionRefusedError("refused")
    closer = threading.Thread(target=writer.close, args=(5,))
    closer.start()
    while writer.stats.dropped == 0:  # close() has begun once submit is refused
        writer.submit("ns", "probe")
    send.gate.set()
    closer.join(5)
    stats = writer.stats
    # "first" fails, then one shutdown batch fails, and the 9 left are not tried.
    assert (stats.failed, stats.failed_writes, stats.queued) == (11, 2, 0)


def test_close_returns_after_its_timeout_when_the_server_hangs() -> None:
    send = FakeSend()
    send.gate.clear()
    writer = BatchWriter(send, batch_size=1, flush_interval_s=0.01)
    writer.submit("ns", "stuck")
    assert send.entered.wait(5)
    started = time.monotonic()
    writer.close(0.2)
    assert time.monotonic() - started < 2
    assert not writer.flush(0.05)
    send.gate.set()


def test_invalid_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        BatchWriter(FakeSend(), queue_size=0)
