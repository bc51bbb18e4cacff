"""The consumer loop survives what the NATS client throws at it, and never leaks slots."""

from __future__ import annotations

import asyncio
from typing import Any

import nats.js.errors
import pytest

from sidecar import consumer as consumer_module
from sidecar.consumer import Consumer
from tests.unit.fake_jetstream import FakeJs, ReadyChannel, consumer_settings
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(20)

SETTINGS = consumer_settings(max_in_flight=8)


class FakeSub:
    """A pull subscription whose fetches fail in the given ways, then stay quiet."""

    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = failures
        self.batches: list[int] = []

    @property
    def fetches(self) -> int:
        return len(self.batches)

    async def fetch(self, batch: int, timeout: float) -> list[Any]:
        self.batches.append(batch)
        if self.failures:
            raise self.failures.pop(0)
        await asyncio.sleep(0.01)
        return []

    async def unsubscribe(self) -> None:
        pass


async def test_plain_timeouts_and_unexpected_errors_do_not_stop_consuming(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(consumer_module, "BIND_RETRY", 0.01)
    # nats-py raises the plain asyncio.TimeoutError from fetch() when its deadline is
    # used up between its two pull requests (a loaded CPU): it once killed the loop.
    sub = FakeSub([TimeoutError(), TimeoutError(), RuntimeError("a bug")])
    js = FakeJs(sub)
    consumer = Consumer(SETTINGS, js, ReadyChannel())  # type: ignore[arg-type]
    consumer.start()
    try:
        await eventually(lambda: sub.fetches >= 6)
        assert consumer.alive
        assert js.binds == 2  # bound again after the unexpected error
        assert set(sub.batches) == {8}  # every slot given back after each failure
    finally:
        await consumer.stop(0)


async def test_jetstream_unavailable_is_waited_out_without_binding_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(consumer_module, "FETCH_ERROR_PAUSE", 0.01)
    # What a restarting server answers a pull request with: the consumer is still there.
    sub = FakeSub([nats.js.errors.ServiceUnavailableError(), nats.js.errors.NotFoundError()])
    js = FakeJs(sub)
    consumer = Consumer(SETTINGS, js, ReadyChannel())  # type: ignore[arg-type]
    consumer.start()
    try:
        await eventually(lambda: sub.fetches >= 4)
        assert js.binds == 2  # not after the 503; after the 404 (consumer gone), yes
    finally:
        await consumer.stop(0)


async def test_a_consumer_deleted_under_the_loop_is_bound_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(consumer_module, "FETCH_ERROR_PAUSE", 0.01)
    # A pull request to a durable that no longer exists has no responders: 503 too.
    sub = FakeSub([nats.js.errors.ServiceUnavailableError()])
    js = FakeJs(sub)
    js.consumer_exists = False
    consumer = Consumer(SETTINGS, js, ReadyChannel())  # type: ignore[arg-type]
    consumer.start()
    try:
        await eventually(lambda: sub.fetches >= 2)
        assert js.binds == 2  # bound again (which creates the consumer) after the 503
    finally:
        await consumer.stop(0)


async def test_messages_fetched_and_never_started_go_back_when_the_consumer_stops() -> None:
    from sidecar import metrics

    left: list[str] = []

    class Held:
        """A message the puller had received and no fetch had handed out."""

        reply = "$JS.ACK.wf.node-a.1.7.7.1700000000000000000.0"
        data = b""

        async def nak(self, delay: float | None = None) -> None:
            left.append("nak")

    class HoldingSub(FakeSub):
        async def unsubscribe(self) -> list[Any]:
            return [Held()]

    sub = HoldingSub([])
    consumer = Consumer(SETTINGS, FakeJs(sub), ReadyChannel())  # type: ignore[arg-type]
    abandoned = metrics.settled("abandoned").value
    consumer.start()
    await eventually(lambda: sub.fetches >= 1)

    await consumer.stop(0)

    assert left == ["nak"]  # back to the stream at once, not after its ack_wait
    assert metrics.settled("abandoned").value == abandoned + 1
