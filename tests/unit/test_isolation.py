"""The sidecar's record of excused deliveries, and the gate that runs a suspect alone."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.isolation import SoloGate, Suspects
from sidecar.outcome import Ack, DeadLetterAndTerm, Nak

pytestmark = pytest.mark.timeout(10)

SUSPECT = Nak(0.1, "host failed", outcome="suspect", counted=False, alone_next=True)
CULPRIT = Nak(0.1, "host failed alone", outcome="culprit_retried", alone_next=True)


def test_a_suspect_is_remembered_until_it_ends() -> None:
    suspects = Suspects()
    suspects.settled(7, Nak(1.0, "retryable"))  # the common retry: nothing kept
    assert len(suspects) == 0
    suspects.settled(7, SUSPECT)
    assert (suspects.of(7).excused, suspects.of(7).alone) == (1, True)
    suspects.settled(7, CULPRIT)
    assert (suspects.of(7).excused, suspects.of(7).alone) == (1, True)
    suspects.settled(7, Ack("done"))
    assert len(suspects) == 0 and not suspects.of(7).alone
    suspects.settled(8, SUSPECT)
    suspects.settled(8, DeadLetterAndTerm("culprit"))
    assert len(suspects) == 0


def test_the_record_is_bounded_oldest_first() -> None:
    suspects = Suspects(limit=3)
    for seq in range(5):
        suspects.settled(seq, SUSPECT)
    assert len(suspects) == 3
    assert not suspects.of(0).alone and suspects.of(4).alone


async def test_a_suspect_waits_for_the_others_and_stops_fetching() -> None:
    tasks: dict[asyncio.Task[None], str] = {}
    order: list[str] = []
    idle_asked: list[float] = []

    async def host_idle(timeout: float) -> bool:
        idle_asked.append(timeout)
        return True

    gate = SoloGate(tasks.keys, host_idle, 5.0)
    release = asyncio.Event()

    async def other(name: str) -> None:
        await release.wait()
        order.append(name)

    async def suspect(name: str) -> None:
        async with gate.alone():
            order.append(f"{name} alone")
            await asyncio.sleep(0.01)

    for name in ("a", "b"):
        tasks[asyncio.create_task(other(name))] = name
    for name in ("s1", "s2"):
        task = asyncio.create_task(suspect(name))
        gate.queue(task)
        tasks[task] = name
    fetch = asyncio.create_task(gate.clear())
    await asyncio.sleep(0.05)
    assert order == [] and not fetch.done()  # neither runs beside a, b; nothing fetched
    release.set()
    await asyncio.wait_for(fetch, 2)
    assert order[:2] == ["a", "b"] or order[:2] == ["b", "a"]
    assert order[2:] == ["s1 alone", "s2 alone"]
    assert idle_asked == [5.0, 5.0]
