"""KRT_MAX_IN_FLIGHT_BYTES: the consumer takes messages only while their bytes fit."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from sidecar.consumer import FETCH_MAX_BYTES, Consumer
from sidecar.message import Decoded, InFlight
from tests.unit.fake_jetstream import (
    FakeJs,
    FakeMsg,
    ReadyChannel,
    ServingSub,
    consumer_settings,
)
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(20)

SETTINGS = consumer_settings(max_in_flight=8, max_in_flight_bytes=1000)


class HeldConsumer:
    """A consumer over `messages` whose handling waits until `release` is set."""

    def __init__(self, messages: list[FakeMsg], max_payload: int, **settings: int) -> None:
        self.sub = ServingSub(messages)
        self.consumer = Consumer(
            replace(SETTINGS, **settings),
            FakeJs(self.sub),  # type: ignore[arg-type]
            ReadyChannel(),  # type: ignore[arg-type]
            max_payload,
        )
        self.consumer._handle = self._handle  # type: ignore[method-assign]
        self.release = asyncio.Event()
        self.handled: list[str] = []
        self.in_flight: list[str] = []
        self.most_bytes = 0

    async def _handle(self, record: InFlight) -> None:
        msg: FakeMsg = record.msg  # type: ignore[assignment]
        self.in_flight.append(msg.name)
        self.most_bytes = max(self.most_bytes, self.consumer.bytes_in_flight)
        await self.release.wait()
        self.in_flight.remove(msg.name)
        self.handled.append(msg.name)


async def test_fetches_stop_at_the_budget_and_are_sized_by_the_room_left() -> None:
    messages = [FakeMsg(250, f"m{i}") for i in range(10)]
    held = HeldConsumer(messages, max_payload=300)
    held.consumer.start()
    try:
        await eventually(lambda: len(held.in_flight) == 4)
        assert held.consumer.bytes_in_flight == 1000
        # 1000 bytes of room / 300 per message at most: 3; then 250 left: one at a time.
        assert held.sub.batches[:2] == [3, 1]
        assert held.in_flight == ["m0", "m1", "m2", "m3"]
        await asyncio.sleep(0.1)  # nothing more is fetched while the budget is used up
        assert len(held.sub.batches) == 2 and len(held.in_flight) == 4

        held.release.set()
        await eventually(lambda: len(held.handled) == 10)
        await eventually(lambda: held.consumer.bytes_in_flight == 0)
        # Never more than one message past the budget (each at most max_payload).
        assert held.most_bytes < 1000 + 300
    finally:
        await held.consumer.stop(0)


async def test_a_message_larger_than_the_budget_goes_through_alone() -> None:
    messages = [FakeMsg(3000, "big"), FakeMsg(100, "a"), FakeMsg(100, "b")]
    held = HeldConsumer(messages, max_payload=4000)
    held.consumer.start()
    try:
        await eventually(lambda: held.in_flight == ["big"])
        await asyncio.sleep(0.1)
        assert held.in_flight == ["big"] and held.sub.batches == [1]

        held.release.set()
        await eventually(lambda: sorted(held.handled) == ["a", "b", "big"])
        assert held.consumer.bytes_in_flight == 0
    finally:
        await held.consumer.stop(0)


async def test_small_messages_fill_the_message_window_over_several_fetches() -> None:
    messages = [FakeMsg(10, f"m{i}") for i in range(20)]
    held = HeldConsumer(messages, max_payload=300)
    held.consumer.start()
    try:
        await eventually(lambda: len(held.in_flight) == 8)  # KRT_MAX_IN_FLIGHT still binds
        assert held.sub.batches[:3] == [3, 3, 2]
        assert held.consumer.bytes_in_flight == 80
    finally:
        held.release.set()
        await held.consumer.stop(1)


async def test_fetches_grow_once_small_messages_are_seen() -> None:
    # Counted at max_payload the budget would allow 1000 // 300 = 3 per fetch forever;
    # the size of the messages seen takes over within a few fetches.
    messages = [FakeMsg(10, f"m{i}") for i in range(50)]
    held = HeldConsumer(messages, max_payload=300, max_in_flight=50)
    held.consumer.start()
    try:
        await eventually(lambda: len(held.in_flight) == 50)
        assert held.sub.batches[0] == 3
        assert max(held.sub.batches) > 3, held.sub.batches
        assert held.consumer.bytes_in_flight == 500
    finally:
        held.release.set()
        await held.consumer.stop(1)


async def test_the_size_hint_jumps_up_at_once_and_comes_down_slowly() -> None:
    consumer = Consumer(
        SETTINGS,
        FakeJs(ServingSub([])),  # type: ignore[arg-type]
        ReadyChannel(),  # type: ignore[arg-type]
        max_payload=1600,
    )
    assert consumer._size_hint == 1600  # nothing seen yet: the worst case
    consumer._count_size(100)
    assert consumer._size_hint == 1500
    consumer._count_size(1550)
    assert consumer._size_hint == 1550
    for _ in range(200):
        consumer._count_size(100)
    assert consumer._size_hint == 100


async def test_one_fetch_never_asks_for_more_than_fetch_max_bytes() -> None:
    consumer = Consumer(
        replace(SETTINGS, max_in_flight=1000, max_in_flight_bytes=10**12),
        FakeJs(ServingSub([])),  # type: ignore[arg-type]
        ReadyChannel(),  # type: ignore[arg-type]
        max_payload=1024 * 1024,
    )
    assert consumer._batch(1000) == FETCH_MAX_BYTES // (1024 * 1024)
    assert consumer._batch(3) == 3


async def test_a_gunzipped_input_is_counted_and_expected_at_its_gunzipped_size() -> None:
    consumer = Consumer(
        SETTINGS,
        FakeJs(ServingSub([])),  # type: ignore[arg-type]
        ReadyChannel(),  # type: ignore[arg-type]
        max_payload=300,
    )
    record = InFlight(FakeMsg(100), size=100)  # type: ignore[arg-type]
    consumer._window.add_bytes(record.size)
    for _ in range(100):
        consumer._count_size(100)  # a run of small messages: fetches sized for those

    processed: list[InFlight] = []

    def prepare(record: InFlight) -> int:
        return 900  # what its gzip trailer declares

    async def decode(record: InFlight) -> Decoded:
        assert consumer.bytes_in_flight == 900  # charged before decompressing
        return Decoded(None, b"x" * 900)

    async def process(record: InFlight, decoded: Decoded) -> None:
        processed.append(record)

    consumer._processor.prepare = prepare  # type: ignore[method-assign]
    consumer._processor.decode = decode  # type: ignore[method-assign]
    consumer._processor.process = process  # type: ignore[method-assign]
    await consumer._handle(record)

    assert processed == [record]
    assert record.size == 900  # what the window gives back when the message ends
    assert consumer.bytes_in_flight == 900
    assert consumer._size_hint == 900  # the next fetch expects inputs that big


async def test_suspects_and_a_gzipped_input_over_the_budget_all_run() -> None:
    # Two suspects come back together: the first is gzipped and declares more than the
    # whole budget, so it must run alone; the second waits for its turn at the gate. A
    # normal gzipped input is waiting for room too. None may wait for another forever.
    from sidecar.isolation import Suspicion

    consumer = Consumer(
        replace(SETTINGS, max_in_flight_bytes=1000),
        FakeJs(ServingSub([])),  # type: ignore[arg-type]
        ReadyChannel(),  # type: ignore[arg-type]
        max_payload=300,
    )
    declared = {"big-suspect": 5000, "small-suspect": 100, "gzipped": 900}
    ran: list[str] = []

    def prepare(record: InFlight) -> int:
        return declared[record.msg.name]  # type: ignore[attr-defined]

    async def decode(record: InFlight) -> Decoded:
        return Decoded(None)

    async def process(record: InFlight, decoded: Decoded) -> None:
        ran.append(record.msg.name)  # type: ignore[attr-defined]
        await asyncio.sleep(0.01)

    consumer._processor.prepare = prepare  # type: ignore[method-assign]
    consumer._processor.decode = decode  # type: ignore[method-assign]
    consumer._processor.process = process  # type: ignore[method-assign]
    for seq, name in enumerate(["gzipped", "big-suspect", "small-suspect"], start=1):
        msg = FakeMsg(100, name)
        msg.reply = f"$JS.ACK.S.n.2.{seq}.{seq}.1700000000000000000.0"  # type: ignore[attr-defined]
        if name.endswith("suspect"):
            consumer._suspects._known[seq] = Suspicion(excused=1, alone=True)
        consumer._start(msg)  # type: ignore[arg-type]

    await eventually(lambda: len(ran) == 3, timeout=5, what="every message ran")

    assert ran[0] == "gzipped"  # suspects wait until everything else has left the host
    await eventually(lambda: consumer.bytes_in_flight == 0, timeout=5)
