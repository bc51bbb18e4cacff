"""The consumer's bounded in-flight window."""

from __future__ import annotations

import asyncio

from sidecar.window import Window


async def test_take_all_takes_every_free_slot_then_waits() -> None:
    window = Window(4)
    assert await window.take_all() == 4
    assert window.in_flight == 4

    waiting = asyncio.create_task(window.take_all())
    await asyncio.sleep(0)
    assert not waiting.done()

    window.give_back(1)
    window.give_back(1)
    assert await asyncio.wait_for(waiting, 1) == 2
    assert window.in_flight == 4


async def test_unused_slots_come_back() -> None:
    window = Window(8)
    taken = await window.take_all()
    window.give_back(taken - 3)  # the fetch returned only 3 messages
    assert window.in_flight == 3
    assert await window.take_all() == 5


async def test_over_commit_waits_until_below_the_size() -> None:
    window = Window(2)
    await window.take_all()
    window.give_back(-1)  # a fetch returned one message more than asked
    waiting = asyncio.create_task(window.take_all())
    window.give_back(1)
    await asyncio.sleep(0)
    assert not waiting.done()
    window.give_back(1)
    assert await asyncio.wait_for(waiting, 1) == 1


async def test_no_slot_is_taken_while_the_bytes_are_at_the_budget() -> None:
    window = Window(8, max_bytes=100)
    taken = await window.take_all()
    window.add_bytes(60)
    window.add_bytes(40)  # two messages fetched: 100 bytes, the whole budget
    window.give_back(taken - 2)
    assert window.bytes_free == 0

    waiting = asyncio.create_task(window.take_all())
    await asyncio.sleep(0)
    assert not waiting.done()  # free slots, but no room

    window.give_back(1, 40)
    assert await asyncio.wait_for(waiting, 1) == 7
    assert (window.bytes, window.bytes_free) == (60, 40)


async def test_a_message_larger_than_the_whole_budget_goes_through_alone() -> None:
    window = Window(8, max_bytes=100)
    taken = await window.take_all()  # nothing in flight: room, so slots are taken
    window.add_bytes(500)
    window.give_back(taken - 1)

    waiting = asyncio.create_task(window.take_all())
    await asyncio.sleep(0)
    assert not waiting.done()

    window.give_back(1, 500)
    assert await asyncio.wait_for(waiting, 1) == 8
    assert window.bytes == 0


async def test_without_a_budget_only_slots_count() -> None:
    window = Window(2)
    taken = await window.take_all()
    window.add_bytes(10**12)
    window.give_back(taken - 1)
    assert window.bytes_free is None
    assert await asyncio.wait_for(window.take_all(), 1) == 1


async def test_a_reservation_that_fits_is_charged_at_once() -> None:
    window = Window(8, max_bytes=1000)
    window.add_bytes(100)

    await asyncio.wait_for(window.reserve(100, 800), 1)

    assert window.bytes == 900


async def test_a_reservation_waits_for_room_then_is_charged() -> None:
    window = Window(8, max_bytes=1000)
    window.add_bytes(600)  # another message, being handled
    window.add_bytes(100)  # the gzipped one, as fetched
    reserving = asyncio.create_task(window.reserve(100, 800))
    await asyncio.sleep(0.01)
    assert not reserving.done() and window.bytes == 700

    window.give_back(1, 600)  # the other message ends
    await asyncio.wait_for(reserving, 1)

    assert window.bytes == 900


async def test_gzipped_messages_bigger_than_the_budget_go_one_at_a_time() -> None:
    # Two 100-byte inputs that each declare 5,000 bytes, over a 1,000 byte budget: the
    # first goes alone; the second waits until the first ends, never both at once.
    window = Window(8, max_bytes=1000)
    window.add_bytes(100)
    window.add_bytes(100)
    first = asyncio.create_task(window.reserve(100, 4900))
    second = asyncio.create_task(window.reserve(100, 4900))
    await asyncio.wait_for(first, 1)
    await asyncio.sleep(0.01)
    assert not second.done() and window.bytes == 5100

    window.give_back(1, 5000)  # the first one ends
    await asyncio.wait_for(second, 1)

    assert window.bytes == 5000


async def test_a_cancelled_reservation_leaves_nothing_behind() -> None:
    window = Window(8, max_bytes=1000)
    window.add_bytes(900)
    window.add_bytes(100)
    first = asyncio.create_task(window.reserve(100, 500))
    second = asyncio.create_task(window.reserve(100, 500))
    await asyncio.sleep(0.01)

    second.cancel()
    first.cancel()
    await asyncio.gather(first, second, return_exceptions=True)

    assert window.bytes == 1000 and window._queued == 0
