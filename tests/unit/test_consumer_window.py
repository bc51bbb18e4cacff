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
