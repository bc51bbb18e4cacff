"""JetStream publishes and their PubAcks: one reply subscription, a future and a timer each.

Works around nats-py 2.16. `js.publish` is a request per message: an inbox token, a
future and an `asyncio.wait_for` (a waiter future and a task switch). `js.publish_async`
avoids the `wait_for`, but takes a slot of a 4,000-slot semaphore and registers its
future before it publishes, and keeps both when the publish raises (a closed
connection, a full reconnect buffer): enough outages and every publish waits for a slot
forever (tests/integration/test_nats_py_workarounds.py fails once that is fixed).
`PubAcks` does what both do with neither cost: one wildcard subscription for every
reply, and per publish a future and a `call_later` timer that are removed in `finally`,
whatever happens.
"""

from __future__ import annotations

import asyncio
import itertools
import json

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import Header, PubAck

NO_RESPONDERS = "503"  # the status of a reply when no stream captures the subject


class PubAcks:
    """`await publish(...)` returns the PubAck, or raises as `js.publish` does."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = ""
        self._sub: Subscription | None = None
        self._starting = asyncio.Lock()
        self._waiting: dict[str, asyncio.Future[PubAck]] = {}
        self._tokens = itertools.count(1)

    @property
    def waiting(self) -> int:
        """PubAcks awaited right now."""
        return len(self._waiting)

    async def start(self) -> None:
        """Subscribe to the replies (nats-py subscribes again after a reconnect)."""
        async with self._starting:
            if self._sub is None:
                self._prefix = self._nc.new_inbox() + "."
                self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str], timeout: float
    ) -> PubAck:
        """Publish and wait for the stream's PubAck; nats.errors.TimeoutError after `timeout`."""
        if self._sub is None:
            await self.start()
        token = str(next(self._tokens))
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[PubAck] = loop.create_future()
        self._waiting[token] = waiter
        timer: asyncio.TimerHandle | None = None
        try:
            await self._nc.publish(subject, data, reply=self._prefix + token, headers=headers)
            # From the publish on, as js.publish's wait_for: not the time to buffer it.
            timer = loop.call_later(timeout, _expire, waiter)
            return await waiter
        finally:
            if timer is not None:
                timer.cancel()
            del self._waiting[token]

    async def _on_reply(self, msg: Msg) -> None:
        waiter = self._waiting.get(msg.subject[len(self._prefix) :])
        if waiter is None or waiter.done():
            return  # its publisher gave up (timeout, shutdown): nothing waits for it
        if msg.headers and msg.headers.get(Header.STATUS) == NO_RESPONDERS:
            waiter.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            waiter.set_result(_pub_ack(msg.data))
        except nats.errors.Error as exc:
            waiter.set_exception(exc)
        except Exception as exc:  # a reply that is no PubAck: fail now, not at the timeout
            text = f"not a PubAck ({exc!r}): {msg.data[:200]!r}"
            waiter.set_exception(nats.js.errors.Error(text))


def _pub_ack(data: bytes) -> PubAck:
    """The PubAck in a reply; the stream's error (APIError and its kinds) raised."""
    reply = json.loads(data)
    if "error" in reply:
        nats.js.errors.APIError.from_error(reply["error"])  # raises the matching error
    # The fields a PubAck has always had, without `from_response`'s walk of the dataclass.
    return PubAck(
        stream=reply["stream"],
        seq=reply["seq"],
        domain=reply.get("domain"),
        duplicate=reply.get("duplicate"),
    )


def _expire(waiter: asyncio.Future[PubAck]) -> None:
    if not waiter.done():
        waiter.set_exception(nats.errors.TimeoutError())
