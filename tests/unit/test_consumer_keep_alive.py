"""In-progress acks: one keep-alive task in the consumer for every message in flight."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import replace

import pytest

from sidecar.consumer import Consumer, due_for_in_progress
from sidecar.message import InFlight
from tests.unit.fake_jetstream import (
    FakeJs,
    FakeMsg,
    ReadyChannel,
    ServingSub,
    consumer_settings,
)
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(20)

ACK_WAIT = 1.2  # long enough that a busy machine cannot stretch a gap past it
SETTINGS = consumer_settings(ack_wait=ACK_WAIT)


def test_due_are_the_unsettled_records_silent_since_the_given_time() -> None:
    old, fresh, settled = InFlight(FakeMsg(1)), InFlight(FakeMsg(1)), InFlight(FakeMsg(1))  # type: ignore[arg-type]
    old.pinged_at, fresh.pinged_at, settled.pinged_at = 10.0, 10.5, 9.0
    settled.settled = True
    assert due_for_in_progress([old, fresh, settled], silent_since=10.0) == [old]
    assert due_for_in_progress([old, fresh, settled], silent_since=11.0) == [old, fresh]


def test_a_record_counts_as_heard_of_when_it_is_made() -> None:
    before = time.monotonic()
    assert before <= InFlight(FakeMsg(1)).pinged_at <= time.monotonic()  # type: ignore[arg-type]


async def test_long_messages_get_in_progress_acks_until_settled() -> None:
    slow = FakeMsg(10, "slow", fail_first_in_progress=True)
    quick = FakeMsg(10, "quick")
    done_early = FakeMsg(10, "settled-early")
    sub = ServingSub([slow, quick, done_early])
    consumer = Consumer(SETTINGS, FakeJs(sub), ReadyChannel())  # type: ignore[arg-type]
    finish_slow = asyncio.Event()
    handled: list[str] = []

    async def handle(record: InFlight) -> None:
        msg: FakeMsg = record.msg  # type: ignore[assignment]
        if msg.name == "slow":
            await finish_slow.wait()
        elif msg.name == "settled-early":
            record.settled = True  # its ack is decided: no keep-alive, however long it takes
            await asyncio.sleep(3 * ACK_WAIT)
        record.settled = True
        handled.append(msg.name)

    consumer._handle = handle  # type: ignore[method-assign]
    consumer.start()
    try:
        await eventually(lambda: len(slow.in_progress_at) >= 4, timeout=15)
        # Three messages in flight, one keep-alive task for all of them.
        names = [task.get_name() for task in asyncio.all_tasks()]
        assert names.count("consumer-keep-alive") == 1, names
        finish_slow.set()
        await eventually(lambda: len(handled) == 3, timeout=10)
        pings = len(slow.in_progress_at)
        await asyncio.sleep(ACK_WAIT)
    finally:
        await consumer.stop(1)

    # JetStream heard of the slow message well within every ack wait (the first in-progress
    # ack failed, the next look sent one), and nothing once it was settled.
    times = [slow.fetched_at, *slow.in_progress_at]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) < ACK_WAIT, gaps
    assert min(gaps) >= ACK_WAIT / 3 - 0.01, gaps
    assert len(slow.in_progress_at) == pings
    assert quick.in_progress_at == [] and done_early.in_progress_at == []


async def test_the_keep_alive_task_ends_with_the_consumer() -> None:
    consumer = Consumer(
        replace(SETTINGS, ack_wait=30.0),
        FakeJs(ServingSub([])),  # type: ignore[arg-type]
        ReadyChannel(),  # type: ignore[arg-type]
    )
    consumer.start()
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert "consumer-keep-alive" in names
    await consumer.stop(0)
    assert "consumer-keep-alive" not in {t.get_name() for t in asyncio.all_tasks()}
