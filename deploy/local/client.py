"""The other side of a node, as KRE's previous node and next node see it.

`Upstream` publishes KRE envelopes to the node's input subject; `Downstream` reads every
envelope the node wrote to its output subject from the stream itself, so duplicates
show up (a plain subscription would hide a lost or repeated publish); `DeadLetters`
reads the node's dead-letter subject the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Self

import nats
import nats.errors
from google.protobuf.message import Message
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from protos.kre_nats_msg_pb2 import KreNatsMessage


def now_kre() -> str:
    """Now, as KRE's entrypoint and runners write tracking times: naive UTC, microseconds."""
    return datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="microseconds")


def request_envelope(
    payload: Message,
    tracking_id: str | None = None,
    from_node: str = "entrypoint",
    replied: bool = False,
) -> KreNatsMessage:
    """An input envelope as the previous KRE node would have written it."""
    msg = KreNatsMessage(
        tracking_id=tracking_id or uuid.uuid4().hex, replied=replied, reply="_INBOX.kre-demo"
    )
    stamp = now_kre()
    msg.tracking.add(node_name=from_node, start=stamp, end=stamp)
    msg.payload.Pack(payload)
    return msg


async def connect(url: str) -> tuple[Client, JetStreamContext]:
    nc = await nats.connect(
        url, name="kre-local-client", max_reconnect_attempts=-1, reconnect_time_wait=0.2
    )
    return nc, nc.jetstream()


async def ensure_stream(js: JetStreamContext, name: str, subjects: Iterable[str]) -> None:
    """Create the node's stream, or widen its subjects when it exists."""
    wanted = list(dict.fromkeys(subjects))  # in order, without repeats
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        await js.add_stream(name=name, subjects=wanted)
        return
    have = list(info.config.subjects or [])
    missing = [s for s in wanted if s not in have]
    if missing:
        info.config.subjects = have + missing
        await js.update_stream(info.config)


class Upstream:
    """Publishes requests through JetStream, a bounded number of PubAcks at a time."""

    def __init__(self, js: JetStreamContext, subject: str, window: int = 256) -> None:
        self.js = js
        self.subject = subject
        self.window = window
        self.sent_at: dict[str, float] = {}

    async def send(self, envelope: KreNatsMessage | bytes, tracking_id: str = "") -> None:
        data = envelope if isinstance(envelope, bytes) else envelope.SerializeToString()
        key = tracking_id or (envelope.tracking_id if isinstance(envelope, KreNatsMessage) else "")
        self.sent_at[key] = time.perf_counter()
        await self.js.publish(self.subject, data)

    async def send_all(self, envelopes: Iterable[KreNatsMessage]) -> None:
        pending: set[asyncio.Task[None]] = set()
        for envelope in envelopes:
            if len(pending) >= self.window:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            pending.add(asyncio.create_task(self.send(envelope)))
        if pending:
            await asyncio.gather(*pending)


class _StreamReader:
    """Reads everything written to some subjects of the stream, from the first message on.

    An ephemeral pull consumer per subject, with no acks; `stored_at` holds each
    message's JetStream timestamp (epoch seconds), in the order read.
    """

    def __init__(self, js: JetStreamContext, stream: str, subject: str, *more: str) -> None:
        self.js = js
        self.stream = stream
        self.subject = subject
        self.subjects = list(dict.fromkeys((subject, *more)))
        self.stored_at: list[float] = []
        self._subs: list[JetStreamContext.PullSubscription] = []

    @property
    def count(self) -> int:
        return len(self.stored_at)

    async def start(self) -> Self:
        for subject in self.subjects:
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.NONE,
                filter_subject=subject,
                inactive_threshold=300.0,
            )
            self._subs.append(
                await self.js.pull_subscribe(
                    subject, durable=None, stream=self.stream, config=config
                )
            )
        return self

    async def poll(self, batch: int = 512, timeout: float = 0.2) -> int:
        assert self._subs, "call start() first"
        found = 0
        for sub in self._subs:
            try:
                msgs = await sub.fetch(batch, timeout=timeout / len(self._subs))
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for raw in msgs:
                self._take(raw)
                self.stored_at.append(raw.metadata.timestamp.timestamp())
            found += len(msgs)
        return found

    def _take(self, raw: Msg) -> None:
        raise NotImplementedError

    async def wait_count(self, count: int, timeout: float, batch: int = 512) -> None:
        """Until `count` messages were read (then a short quiet look for extras) or timeout."""
        deadline = time.monotonic() + timeout
        while self.count < count and time.monotonic() < deadline:
            await self.poll(batch)
        await self.poll(batch, timeout=0.3)  # anything beyond `count` is worth seeing

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        self._subs = []


class Downstream(_StreamReader):
    """The KRE envelopes a node wrote to its output subject (and to any other subjects
    given, such as the entrypoint's, where errors go), duplicates included."""

    def __init__(self, js: JetStreamContext, stream: str, subject: str, *more: str) -> None:
        super().__init__(js, stream, subject, *more)
        self.received: list[KreNatsMessage] = []
        self.received_at: dict[str, float] = {}
        self.subject_of: dict[str, str] = {}  # tracking id: the subject it came on (last)

    def _take(self, raw: Msg) -> None:
        envelope = KreNatsMessage.FromString(decompress(raw.data))
        self.received.append(envelope)
        self.received_at.setdefault(envelope.tracking_id, time.perf_counter())
        self.subject_of[envelope.tracking_id] = raw.subject

    async def wait_for(self, count: int, timeout: float, batch: int = 512) -> list[KreNatsMessage]:
        """Until `count` envelopes arrived (then a short quiet look for extras) or timeout."""
        await self.wait_count(count, timeout, batch)
        return self.received

    def by_tracking_id(self) -> dict[str, KreNatsMessage]:
        return {m.tracking_id: m for m in self.received}

    def duplicates(self) -> int:
        counts = Counter(m.tracking_id for m in self.received)
        return sum(n - 1 for n in counts.values() if n > 1)


@dataclass(frozen=True)
class DeadLetter:
    """One message of a dead-letter subject: the input's bytes and the sidecar's headers."""

    data: bytes
    headers: dict[str, str]

    @property
    def reason(self) -> str:
        return self.headers.get("Kre-Dlq-Reason", "")

    @property
    def sequence(self) -> int:
        return int(self.headers.get("Kre-Dlq-Sequence", "0"))


class DeadLetters(_StreamReader):
    """The dead letters a node wrote (`KRT_NATS_DLQ_SUBJECT`)."""

    def __init__(self, js: JetStreamContext, stream: str, subject: str) -> None:
        super().__init__(js, stream, subject)
        self.received: list[DeadLetter] = []

    def _take(self, raw: Msg) -> None:
        self.received.append(DeadLetter(raw.data, dict(raw.headers or {})))

    async def wait_for(self, count: int, timeout: float) -> list[DeadLetter]:
        await self.wait_count(count, timeout)
        return self.received

    def duplicates(self) -> int:
        counts = Counter(letter.sequence for letter in self.received)
        return sum(n - 1 for n in counts.values() if n > 1)


def decompress(data: bytes) -> bytes:
    import gzip

    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
