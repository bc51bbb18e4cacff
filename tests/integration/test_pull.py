"""Puller against a real nats-server: batches, waiting, timeouts, and no message lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig

from deploy.local.nats import NatsServer
from sidecar.pull import Puller, position
from tests.waiting import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
async def stream(nc: Client, stream_name: str) -> AsyncIterator[str]:
    js = nc.jetstream()
    await js.add_stream(name=stream_name, subjects=[f"{stream_name}.>"])
    await js.add_consumer(
        stream_name,
        ConsumerConfig(durable_name="d", ack_policy=AckPolicy.EXPLICIT, ack_wait=30),
    )
    yield stream_name
    await js.delete_stream(stream_name)


async def publish(nc: Client, stream: str, count: int, start: int = 0) -> None:
    js = nc.jetstream()
    for n in range(start, start + count):
        await js.publish(f"{stream}.in", str(n).encode())


async def test_fetches_take_what_is_there_up_to_the_batch_in_stream_order(
    nc: Client, stream: str
) -> None:
    await publish(nc, stream, 10)
    puller = await Puller.bind(nc, stream, "d")

    first = await puller.fetch(4, timeout=1.0)
    got = list(first)
    while len(got) < 10:
        more = await puller.fetch(100, timeout=1.0)
        assert more, "a fetch with messages there came back empty"
        got += more

    # A fetch returns what has come in by then: all 4 here, or fewer under load.
    assert 1 <= len(first) <= 4
    assert [m.data for m in got] == [str(n).encode() for n in range(10)]
    assert {m.subject for m in got} == {f"{stream}.in"}
    assert [position(m) for m in got[:2]] == [(1, 1), (2, 1)]
    await puller.unsubscribe()


async def test_a_fetch_on_a_quiet_consumer_returns_as_soon_as_a_message_comes(
    nc: Client, stream: str
) -> None:
    puller = await Puller.bind(nc, stream, "d")
    fetching = asyncio.create_task(puller.fetch(32, timeout=5.0))
    await asyncio.sleep(0.3)
    sent = time.monotonic()
    await publish(nc, stream, 1)

    msgs = await fetching

    assert [m.data for m in msgs] == [b"0"]
    assert time.monotonic() - sent < 1.0, "a waiting fetch held a message back"
    await puller.unsubscribe()


async def test_a_fetch_with_nothing_there_times_out_and_the_next_gets_what_came(
    nc: Client, stream: str
) -> None:
    puller = await Puller.bind(nc, stream, "d")
    began = time.monotonic()

    with pytest.raises(nats.errors.TimeoutError):
        await puller.fetch(8, timeout=0.5)
    assert 0.4 < time.monotonic() - began < 2.0

    await publish(nc, stream, 3)
    got: list[bytes] = []
    while len(got) < 3:
        got += [m.data for m in await puller.fetch(8, timeout=1.0)]
    assert got == [b"0", b"1", b"2"]
    await puller.unsubscribe()


async def test_every_message_is_handed_out_once_and_acked_none_come_back(
    nc: Client, stream: str
) -> None:
    await publish(nc, stream, 300)
    puller = await Puller.bind(nc, stream, "d")
    seen: list[int] = []

    while len(seen) < 300:
        msgs = await puller.fetch(32, timeout=1.0)
        assert len(msgs) <= 32
        for msg in msgs:
            seen.append(int(msg.data))
            await msg.ack()

    assert seen == list(range(300))
    with pytest.raises(nats.errors.TimeoutError):
        await puller.fetch(32, timeout=0.5)
    info = await nc.jetstream().consumer_info(stream, "d")
    assert (info.num_ack_pending, info.num_pending, info.num_redelivered) == (0, 0, 0)
    await puller.unsubscribe()


async def test_a_consumer_that_does_not_exist_is_an_error_not_a_wait(
    nc: Client, stream: str
) -> None:
    puller = await Puller.bind(nc, stream, "nobody")

    with pytest.raises((nats.js.errors.APIError, nats.errors.TimeoutError)) as caught:
        await puller.fetch(8, timeout=1.0)
    print(repr(caught.value))
    await puller.unsubscribe()


async def test_at_max_ack_pending_no_request_stays_open_to_be_filled_later(
    nc: Client, stream_name: str
) -> None:
    # Another replica holds all of max_ack_pending: this one's requests cannot be served.
    js = nc.jetstream()
    await js.add_stream(name=stream_name, subjects=[f"{stream_name}.>"])
    config = ConsumerConfig(
        durable_name="d", ack_policy=AckPolicy.EXPLICIT, ack_wait=60, max_ack_pending=5
    )
    await js.add_consumer(stream_name, config)
    try:
        await publish(nc, stream_name, 200)
        other = await Puller.bind(nc, stream_name, "d")
        held_elsewhere = []
        while len(held_elsewhere) < 5:
            held_elsewhere += await other.fetch(5 - len(held_elsewhere), timeout=1.0)
        puller = await Puller.bind(nc, stream_name, "d")
        for _ in range(3):
            with pytest.raises(nats.errors.TimeoutError):
                await puller.fetch(32, timeout=1.0)

        info = await js.consumer_info(stream_name, "d")
        assert info.num_waiting <= 1, "pull requests left open on the server"
        for msg in held_elsewhere:
            await msg.ack()
        await asyncio.sleep(1.0)
        # At most the last one-message wait may have been served; nothing else came unasked.
        assert puller.waiting <= 1
        info = await js.consumer_info(stream_name, "d")
        assert info.num_ack_pending <= 1
        await other.unsubscribe()
        await puller.unsubscribe()
    finally:
        await js.delete_stream(stream_name)


async def test_messages_held_when_unsubscribing_are_handed_back(nc: Client, stream: str) -> None:
    await publish(nc, stream, 3)
    puller = await Puller.bind(nc, stream, "d")
    await puller._ask({"batch": 3, "no_wait": True})  # answered after no fetch waits for it
    await eventually(lambda: puller.waiting >= 3)
    assert puller.waiting == 3

    held = await puller.unsubscribe()  # handed to the caller, who gives them back now
    assert [m.data for m in held] == [b"0", b"1", b"2"]
    for msg in held:
        await msg.nak()

    again = await Puller.bind(nc, stream, "d")
    msgs = await again.fetch(8, timeout=2.0)
    assert [(m.data, position(m)[1]) for m in msgs] == [(b"0", 2), (b"1", 2), (b"2", 2)]
    await again.unsubscribe()


async def test_pull_requests_go_to_the_api_of_a_jetstream_domain() -> None:
    with NatsServer(config='jetstream { domain: "hub" }\n') as server:
        client = await nats.connect(server.url)
        try:
            js = client.jetstream(domain="hub")
            await js.add_stream(name="dom", subjects=["dom.>"])
            await js.add_consumer("dom", ConsumerConfig(durable_name="d"))
            await js.publish("dom.in", b"0")
            puller = await Puller.bind(client, "dom", "d", api_prefix="$JS.hub.API")
            elsewhere = await Puller.bind(client, "dom", "d", api_prefix="$JS.other.API")

            # A message is waiting, but nobody answers another domain's API.
            with pytest.raises(nats.errors.Error):
                await elsewhere.fetch(4, timeout=1.0)
            msgs = await puller.fetch(4, timeout=2.0)

            assert [m.data for m in msgs] == [b"0"]
            await puller.unsubscribe()
            await elsewhere.unsubscribe()
        finally:
            await client.close()
