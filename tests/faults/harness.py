"""One fault case's traffic and its verdict: every request answered exactly once.

`Load` publishes the requests (good envelopes and, for case 6, poison), follows the
replies while the fault is injected, then reads the output subject and the dead-letter
subject again from the stream's first message and checks every request was answered
exactly once, every poison input dead-lettered exactly once, the consumer left with
nothing pending or un-acked, and that the fault really hit mid-load (JetStream's own
timestamps say some, but not all, replies were stored before it).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf.wrappers_pb2 import StringValue
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo

from deploy.local.client import DeadLetters, Downstream, request_envelope
from deploy.local.node import NodeConfig
from protos.kre_nats_msg_pb2 import KreNatsMessage
from tests.waiting import eventually


@dataclass
class Row:
    """One line of the summary table printed at the end of the session."""

    case: str
    sent: int
    answered: int
    duplicates: int
    dead_letters: int
    recovery: float | None  # from the fault to the last reply
    pause: float | None  # the longest pause in replies, from the fault on
    elapsed: float  # from the first publish to the last reply


@dataclass(frozen=True)
class Bad:
    """A poison input: bytes that are no usable KRE envelope (tracking id when it has one)."""

    data: bytes
    tracking_id: str = ""


def texts(count: int, prefix: str = "r", size: int = 0) -> list[KreNatsMessage]:
    """`count` requests "<prefix><i>", padded to `size` characters when given."""
    return [
        request_envelope(StringValue(value=f"{prefix}{i}".ljust(size, "."))) for i in range(count)
    ]


def delivered(info: ConsumerInfo) -> int:
    """How many deliveries the consumer has made, redeliveries included."""
    assert info.delivered is not None
    return info.delivered.consumer_seq


class Load:
    def __init__(
        self, js: JetStreamContext, config: NodeConfig, case: str, report: list[Row]
    ) -> None:
        self.js = js
        self.config = config
        self.case = case
        self.report = report
        self.requests: dict[str, KreNatsMessage] = {}
        self.poison: dict[int, Bad] = {}  # by stream sequence
        self.started_at = 0.0
        self.fault_at: float | None = None
        self.live: Downstream | None = None

    @property
    def expected(self) -> int:
        return len(self.requests) + len(self.poison)

    async def start(self) -> Load:
        """Start following the output subject (call again after a NATS restart)."""
        if self.live is not None:
            await self.live.stop()
        config = self.config  # outputs, and the error envelopes sent to the entrypoint
        self.live = await Downstream(
            self.js, config.stream, config.output_subject, config.entrypoint_subject
        ).start()
        return self

    async def send(self, items: Iterable[KreNatsMessage | Bad], window: int = 256) -> None:
        """Publish everything through JetStream, `window` PubAcks outstanding at most."""
        self.started_at = self.started_at or time.time()
        slots = asyncio.Semaphore(window)

        async def one(item: KreNatsMessage | Bad) -> None:
            async with slots:
                if isinstance(item, Bad):
                    ack = await self.js.publish(self.config.input_subject, item.data)
                    self.poison[ack.seq] = item
                else:
                    self.requests[item.tracking_id] = item
                    await self.js.publish(self.config.input_subject, item.SerializeToString())

        await asyncio.gather(*(one(item) for item in items))

    async def answered(self, batch: int = 512) -> int:
        """Replies seen so far by the live reader (a poll first)."""
        assert self.live is not None, "call start() first"
        await self.live.poll(batch, timeout=0.1)
        return self.live.count

    async def until_answered(self, count: int, timeout: float = 60, batch: int = 512) -> int:
        """Wait until `count` replies arrived; the fault is meant to hit after this."""

        async def enough() -> bool:
            return await self.answered(batch) >= count

        await eventually(enough, timeout, f"{count} replies")
        return self.live.count if self.live else 0

    def fault(self) -> None:
        """Call right before injecting the fault."""
        self.fault_at = time.time()

    async def settled(self, durable: str, timeout: float) -> ConsumerInfo:
        """Until the consumer has nothing pending and nothing waiting for an ack."""
        info: ConsumerInfo | None = None

        async def check() -> bool:
            nonlocal info
            info = await self.js.consumer_info(self.config.stream, durable)
            return info.num_pending == 0 and info.num_ack_pending == 0

        await eventually(check, timeout, f"consumer {durable} settled")
        assert info is not None
        return info

    async def finish(self, timeout: float = 120, batch: int = 512) -> tuple[Row, ConsumerInfo]:
        """Wait for every reply and a settled consumer, read it all again, check, report."""
        await self.until_answered(self.expected, timeout, batch)
        info = await self.settled(self.config.node_name, timeout)
        config = self.config
        replies = await Downstream(
            self.js, config.stream, config.output_subject, config.entrypoint_subject
        ).start()
        await replies.wait_for(self.expected, 30, batch)
        letters = DeadLetters(self.js, self.config.stream, self.config.dlq_subject)
        await (await letters.start()).wait_for(len(self.poison), 30)
        row = self._row(replies, letters)
        self.report.append(row)
        self._check_replies(replies)
        self._check_dead_letters(letters)
        self._check_mid_load(replies)
        await replies.stop()
        await letters.stop()
        if self.live is not None:
            await self.live.stop()
        return row, info

    def _row(self, replies: Downstream, letters: DeadLetters) -> Row:
        stored = sorted(replies.stored_at)
        last = stored[-1] if stored else time.time()
        recovery = pause = None
        if self.fault_at is not None:
            after = [self.fault_at] + [t for t in stored if t >= self.fault_at]
            recovery = last - self.fault_at
            pause = max((b - a for a, b in itertools.pairwise(after)), default=0.0)
        tracked = Counter(m.tracking_id for m in replies.received if m.tracking_id)
        anonymous = sum(1 for m in replies.received if not m.tracking_id)
        expected_anonymous = sum(1 for bad in self.poison.values() if not bad.tracking_id)
        answered = sum(1 for tid in tracked if self._is_sent(tid))
        answered += min(anonymous, expected_anonymous)
        duplicates = sum(n - 1 for n in tracked.values()) + max(anonymous - expected_anonymous, 0)
        return Row(
            case=self.case,
            sent=self.expected,
            answered=answered,
            duplicates=duplicates,
            dead_letters=len(letters.received),
            recovery=recovery,
            pause=pause,
            elapsed=last - self.started_at,
        )

    def _is_sent(self, tracking_id: str) -> bool:
        return tracking_id in self.requests or any(
            bad.tracking_id == tracking_id for bad in self.poison.values()
        )

    def _check_replies(self, replies: Downstream) -> None:
        counts = Counter(m.tracking_id for m in replies.received)
        tracked_poison = {bad.tracking_id for bad in self.poison.values() if bad.tracking_id}
        missing = [t for t in [*self.requests, *tracked_poison] if counts[t] == 0]
        repeated = [t for t, n in counts.items() if t and n > 1]
        unknown = [t for t in counts if t and t not in self.requests and t not in tracked_poison]
        assert not missing, f"{len(missing)} requests never answered, e.g. {missing[:3]}"
        assert not repeated, f"{len(repeated)} requests answered twice, e.g. {repeated[:3]}"
        assert not unknown, f"replies to requests never sent: {unknown[:3]}"
        expected_anonymous = len(self.poison) - len(tracked_poison)
        assert counts[""] == expected_anonymous, "one error envelope per undecodable input"
        for reply in replies.received:
            request = self.requests.get(reply.tracking_id)
            if request is None:
                assert reply.error.startswith(f"error in '{self.config.node_name}': bad input")
                continue
            assert not reply.error, reply.error
            sent, got = StringValue(), StringValue()
            request.payload.Unpack(sent)
            reply.payload.Unpack(got)
            assert got.value == f"echo {sent.value}"

    def _check_dead_letters(self, letters: DeadLetters) -> None:
        by_seq = Counter(letter.sequence for letter in letters.received)
        assert set(by_seq) == set(self.poison), "one dead letter per poison input, none else"
        assert max(by_seq.values(), default=1) == 1, "a poison input dead-lettered twice"
        for letter in letters.received:
            assert letter.data == self.poison[letter.sequence].data
            assert letter.reason.startswith("bad input: ")

    def _check_mid_load(self, replies: Downstream) -> None:
        if self.fault_at is None:
            return
        before = sum(1 for t in replies.stored_at if t < self.fault_at)
        assert 0 < before < self.expected, (
            f"the fault hit with {before} of {self.expected} replies stored: not mid-load, "
            "so nothing was tested"
        )
