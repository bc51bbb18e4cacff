"""The consumer's bounded in-flight window."""

from __future__ import annotations

import asyncio

from sidecar.consumer import Window


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
