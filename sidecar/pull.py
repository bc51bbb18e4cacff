"""Pull requests to a durable consumer, answered into one subscription.

Works around nats-py 2.16, whose `PullSubscription.fetch` waits for each message of a
batch with `next_msg`: a uuid, a task and an `asyncio.wait_for` per message, a cost
that shows in the sidecar's CPU when messages come in bursts (docs/performance.md,
"Fetching"); tests/integration/test_nats_py_workarounds.py fails once nats-py stops
doing so. `Puller.fetch` asks JetStream the same things (`<API prefix>.CONSUMER.MSG.NEXT`,
with the prefix of a JetStream domain when one is set) and collects the answers from
one subscription's callback:

- first a `no_wait` request for the whole batch, expiring after 50 ms: the server sends
  what it has at once;
- when it had none, a request for ONE message that waits up to the timeout, so a quiet
  consumer takes a message as soon as it comes, and the server is never asked for more
  than the window has room for while the sidecar waits.

A fetch returns as soon as messages are there (all that came in together), up to the
batch. Each request has its own reply subject (the inbox and a number), so a status is
matched to its request; a late status from one that timed out on this side ends nothing.
Messages are the consumer's whichever request they answer: one that comes after its
fetch returned is handed out by the next fetch, or by `unsubscribe`. While NATS is
disconnected no request is sent: nats-py would buffer them all and the server answer
them all at the reconnect. A status other than 404, 408, 409 or 100 (heartbeat) is
raised as nats-py raises it (`APIError`, 503: `ServiceUnavailableError`).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import Header, StatusCode

DEFAULT_API_PREFIX = "$JS.API"
# Statuses that end a pull request without an error: no messages, the request expired,
# a conflict (leadership change, too many waiting requests), as nats-py's fetch treats them.
_ENDS = frozenset({StatusCode.NO_MESSAGES, StatusCode.REQUEST_TIMEOUT, StatusCode.CONFLICT})
# How long before the caller's timeout the server is asked to expire a waiting request.
_EXPIRY_MARGIN = 0.1
# The first request's expiry. Without one, a `no_wait` request that the server cannot
# answer yet (the consumer is at max_ack_pending, shared with other replicas) stays open
# and is filled later, unasked for; with one, the server holds it that long when it has
# nothing (nats-server treats no_wait with expires as a short wait).
_PROBE_EXPIRES_NS = 50_000_000


class Puller:
    """`fetch(batch, timeout)` and `unsubscribe()`, as a nats-py pull subscription has."""

    def __init__(
        self, nc: Client, stream: str, durable: str, api_prefix: str = DEFAULT_API_PREFIX
    ) -> None:
        self._nc = nc
        self._subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._prefix = ""
        self._sub: Subscription | None = None
        self._numbers = itertools.count(1)
        self._msgs: collections.deque[Msg] = collections.deque()
        self._request = ""  # the reply subject of the request being answered
        self._ended = False  # the current request's status has come
        self._error: nats.js.errors.APIError | None = None  # what that status refused
        self._wake: asyncio.Future[None] | None = None

    @classmethod
    async def bind(
        cls, nc: Client, stream: str, durable: str, api_prefix: str = DEFAULT_API_PREFIX
    ) -> Puller:
        puller = cls(nc, stream, durable, api_prefix)
        puller._prefix = nc.new_inbox() + "."
        puller._sub = await nc.subscribe(puller._prefix + "*", cb=puller._on_msg)
        return puller

    async def unsubscribe(self) -> list[Msg]:
        """Stop taking answers; the messages received but not handed out are returned,
        for the caller to give back now rather than after their ack_wait."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()
        held, self._msgs = self._msgs, collections.deque()
        return list(held)

    @property
    def waiting(self) -> int:
        """Messages received that no fetch has handed out yet."""
        return len(self._msgs)

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Up to `batch` messages; raises nats.errors.TimeoutError when none came in time."""
        if self._sub is None:
            raise nats.errors.BadSubscriptionError("the puller is unsubscribed")
        if self._msgs:  # answers that came after their fetch had returned
            return self._take(batch)
        if not self._nc.is_connected:
            # Requests published now would wait in nats-py's buffer and all be answered
            # at the reconnect: hundreds of messages nobody asked for.
            await asyncio.sleep(timeout)
            raise nats.errors.TimeoutError
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self._ask({"batch": batch, "no_wait": True, "expires": _PROBE_EXPIRES_NS})
        await self._wait(deadline)
        left = deadline - loop.time() - _EXPIRY_MARGIN
        if not self._msgs and self._error is None and left > 0:
            await self._ask({"batch": 1, "expires": int(left * 1e9)})
            await self._wait(deadline)
        if self._msgs:
            return self._take(batch)
        if self._error is not None:
            raise self._error
        raise nats.errors.TimeoutError

    async def _ask(self, request: dict[str, object]) -> None:
        self._request = f"{self._prefix}{next(self._numbers)}"
        self._ended = False
        self._error = None
        await self._nc.publish(self._subject, json.dumps(request).encode(), reply=self._request)

    async def _wait(self, deadline: float) -> None:
        """Until messages are here, the request has ended, or the deadline.

        Woken by the first message: by then nats-py has read every message that came
        with it, and its subscription task hands them all over before this runs again.
        """
        loop = asyncio.get_running_loop()
        while not self._msgs and not self._ended:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._wake = loop.create_future()
            timer = loop.call_later(left, _wake, self._wake)
            try:
                await self._wake
            finally:
                timer.cancel()
                self._wake = None

    def _take(self, batch: int) -> list[Msg]:
        msgs = self._msgs
        if len(msgs) <= batch:
            self._msgs = collections.deque()
            return list(msgs)
        return [msgs.popleft() for _ in range(batch)]

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get(Header.STATUS) if msg.headers and not msg.data else None
        if status is None:
            self._msgs.append(msg)
        elif status == StatusCode.CONTROL_MESSAGE:
            return
        elif msg.subject != self._request:
            return  # the end of a request this side has stopped waiting for
        else:
            self._ended = True
            if status not in _ENDS:
                self._error = _error_of(msg)
        if self._wake is not None:
            _wake(self._wake)


def _error_of(msg: Msg) -> nats.js.errors.APIError:
    try:
        nats.js.errors.APIError.from_msg(msg)  # raises the matching error
    except nats.js.errors.APIError as exc:
        return exc
    return nats.js.errors.APIError()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def position(msg: Msg) -> tuple[int, int]:
    """A JetStream message's stream sequence and delivery attempt, from its ack subject.

    What `msg.metadata` holds, read the way nats-py reads it, without building the rest
    (nats-py builds two dataclasses and a datetime for it, on every message).
    """
    tokens: list[str] = msg.reply.split(".") if msg.reply else []
    if len(tokens) >= 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        if len(tokens) == 9:  # $JS.ACK.stream.consumer.delivered.sseq.cseq.ts.pending
            return int(tokens[5]), int(tokens[4])
        if len(tokens) >= 11:  # v2: $JS.ACK.domain.hash.stream.consumer.delivered.sseq...
            return int(tokens[7]), int(tokens[6])
    meta = msg.metadata  # not a JetStream message: nats-py's own error
    return meta.sequence.stream, meta.num_delivered
