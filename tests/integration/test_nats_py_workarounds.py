"""The nats-py behaviours that `sidecar/pull.py` and `sidecar/pubacks.py` work around.

Each test asserts that the installed nats-py still behaves the way that made the
workaround worth having. When one fails after a nats-py upgrade, the library has
fixed it: the workaround can go (the failure message says which).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

BATCH = 50


@pytest.fixture
async def stream(nc: Client, stream_name: str) -> AsyncIterator[str]:
    js = nc.jetstream()
    await js.add_stream(name=stream_name, subjects=[f"{stream_name}.>"])
    yield stream_name
    await js.delete_stream(stream_name)


async def test_nats_py_fetch_still_makes_a_task_per_message(nc: Client, stream: str) -> None:
    js = nc.jetstream()
    for n in range(BATCH):
        await js.publish(f"{stream}.in", str(n).encode())
    config = ConsumerConfig(durable_name="d", ack_policy=AckPolicy.EXPLICIT)
    await js.add_consumer(stream, config)
    sub = await js.pull_subscribe_bind("d", stream=stream)
    loop = asyncio.get_running_loop()
    made = 0
    default_factory = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal made
        made += 1
        if default_factory is not None:
            return default_factory(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(counting)
    try:
        msgs = await sub.fetch(BATCH, timeout=5)
    finally:
        loop.set_task_factory(default_factory)

    assert len(msgs) == BATCH
    assert made >= BATCH, (
        f"nats-py's fetch made {made} tasks for {BATCH} messages: it no longer waits for "
        "each message with a task of its own, so sidecar/pull.py may not be needed"
    )
    await sub.unsubscribe()


async def test_nats_py_publish_async_still_keeps_a_slot_when_the_publish_raises(
    nc: Client, stream: str
) -> None:
    js = nc.jetstream(publish_async_max_pending=2)
    too_big = b"x" * (nc.max_payload + 1)  # nats-py refuses it before sending anything
    for _ in range(2):
        with pytest.raises(nats.errors.MaxPayloadError):
            await js.publish_async(f"{stream}.out", too_big)

    # Both slots are still taken by the publishes that raised: a good one now stalls.
    with pytest.raises(nats.js.errors.TooManyStalledMsgsError):
        await js.publish_async(f"{stream}.out", b"fine", wait_stall=0.5)
    assert js.publish_async_pending() == 2, (
        "nats-py's publish_async gives its slot back when the publish raises: "
        "sidecar/pubacks.py may not be needed"
    )
