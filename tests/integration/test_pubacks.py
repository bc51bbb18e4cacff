"""PubAcks against a real nats-server: acks, errors, timeouts, and nothing left behind."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import DiscardPolicy

from sidecar.pubacks import PubAcks

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
async def stream(nc: Client, stream_name: str) -> AsyncIterator[str]:
    js = nc.jetstream()
    await js.add_stream(name=stream_name, subjects=[f"{stream_name}.>"])
    yield stream_name
    await js.delete_stream(stream_name)


async def test_publishes_get_their_own_pub_acks_and_duplicates_are_flagged(
    nc: Client, stream: str
) -> None:
    acks = PubAcks(nc)
    await acks.start()
    subject = f"{stream}.out"

    first = await asyncio.gather(
        *(acks.publish(subject, b"x", {"Nats-Msg-Id": f"id-{n}"}, 5) for n in range(50))
    )
    again = await acks.publish(subject, b"x", {"Nats-Msg-Id": "id-7"}, 5)

    assert sorted(ack.seq for ack in first) == list(range(1, 51))
    assert {ack.stream for ack in first} == {stream}
    assert not any(ack.duplicate for ack in first)
    assert again.duplicate and again.seq == first[7].seq
    assert acks.waiting == 0


async def test_a_subject_no_stream_captures_raises_no_stream_response(nc: Client) -> None:
    acks = PubAcks(nc)  # started on first use

    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await acks.publish("nobody.captures.this", b"x", {"Nats-Msg-Id": "a"}, 5)
    assert acks.waiting == 0


async def test_no_pub_ack_in_time_raises_timeout(nc: Client, stream: str) -> None:
    # Something answers nothing: a plain subscriber on a subject outside the stream.
    silent = await nc.subscribe("silent.subject")
    acks = PubAcks(nc)

    with pytest.raises(nats.errors.TimeoutError):
        await acks.publish("silent.subject", b"x", {"Nats-Msg-Id": "b"}, 0.3)
    assert acks.waiting == 0
    await silent.unsubscribe()


async def test_a_publish_that_raises_leaves_nothing_waiting(nc: Client, stream: str) -> None:
    acks = PubAcks(nc)
    await acks.start()
    too_big = b"x" * (nc.max_payload + 1)

    with pytest.raises(nats.errors.MaxPayloadError):
        await acks.publish(f"{stream}.out", too_big, {"Nats-Msg-Id": "c"}, 5)
    assert acks.waiting == 0
    # And the next one works.
    assert (await acks.publish(f"{stream}.out", b"x", {"Nats-Msg-Id": "d"}, 5)).seq == 1


async def test_the_streams_error_comes_back_at_once(nc: Client, stream_name: str) -> None:
    # A stream that takes one message and refuses more: the second gets an error reply.
    js = nc.jetstream()
    await js.add_stream(
        name=stream_name, subjects=[f"{stream_name}.>"], max_msgs=1, discard=DiscardPolicy.NEW
    )
    acks = PubAcks(nc)
    try:
        await acks.publish(f"{stream_name}.out", b"x", {"Nats-Msg-Id": "1"}, 5)
        started = asyncio.get_running_loop().time()
        with pytest.raises(nats.js.errors.APIError) as caught:
            await acks.publish(f"{stream_name}.out", b"y", {"Nats-Msg-Id": "2"}, 5)
        waited = asyncio.get_running_loop().time() - started
    finally:
        await js.delete_stream(stream_name)

    assert "maximum messages exceeded" in str(caught.value)
    assert waited < 4  # the server's answer, not the 5 s timeout
    assert acks.waiting == 0
