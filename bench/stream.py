"""The JetStream side of a measurement: fill the input, wait for the consumer, read the output.

Outputs are read back from the stream itself after the run (not during it, so the reader
takes no CPU from what is measured), with each message's stored timestamp: the drain
rate ends at nats-server's time for the last output, the same for the split runner and
the baseline.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from google.protobuf.wrappers_pb2 import BytesValue
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from deploy.local.client import decompress
from protos.kre_nats_msg_pb2 import KreNatsMessage

PUBLISH_WINDOW = 256
READ_BYTES_PER_FETCH = 16 * 1024 * 1024  # well under nats-py's pending-bytes limit
POLL = 0.05


@dataclass(frozen=True)
class Output:
    tracking_id: str
    stored_at: float  # nats-server's timestamp of the stored output, epoch seconds
    error: str
    payload_crc: int | None


@dataclass(frozen=True)
class Tally:
    """Outputs against inputs: every count must be zero."""

    lost: int  # inputs with no output
    duplicated: int  # outputs beyond the first for one input
    errors: int  # error envelopes, unknown tracking ids, payloads that came back changed

    @property
    def clean(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.errors == 0


async def fresh_stream(js: JetStreamContext, name: str, subjects: list[str]) -> None:
    """A new file-backed stream with nats-server's defaults (as `make demo` creates one)."""
    await js.add_stream(name=name, subjects=subjects)


async def delete_stream(js: JetStreamContext, name: str) -> None:
    try:
        await js.delete_stream(name)
    except nats.js.errors.NotFoundError:
        pass


async def publish_all(
    js: JetStreamContext, subject: str, messages: Iterable[tuple[str, bytes]]
) -> int:
    """Publish every message, PUBLISH_WINDOW PubAcks in flight; return the last stream seq."""
    window = asyncio.Semaphore(PUBLISH_WINDOW)
    last_seq = 0

    async def one(data: bytes) -> None:
        nonlocal last_seq
        try:
            ack = await js.publish(subject, data, timeout=30)
            last_seq = max(last_seq, ack.seq)
        finally:
            window.release()

    tasks = []
    for _, data in messages:
        await window.acquire()
        tasks.append(asyncio.create_task(one(data)))
    await asyncio.gather(*tasks)
    return last_seq


async def wait_consumed(
    js: JetStreamContext,
    stream: str,
    durable: str,
    last_seq: int,
    timeout: float,
    check_alive: Callable[[], None],
) -> None:
    """Until the durable consumer has acked every input up to `last_seq`.

    Acks come after the output's PubAck, so every output is in the stream by then.
    `check_alive` raises when a process under test died.
    """
    deadline = time.monotonic() + timeout
    while True:
        check_alive()
        try:
            info = await js.consumer_info(stream, durable)
        except nats.js.errors.NotFoundError:
            info = None  # not created yet
        if (
            info is not None
            and info.ack_floor is not None
            and (info.ack_floor.stream_seq or 0) >= last_seq
            and not info.num_ack_pending
        ):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"consumer {durable} did not finish in {timeout:.0f}s: {info}")
        await asyncio.sleep(POLL)


async def read_outputs(
    js: JetStreamContext, stream: str, subject: str, message_bytes: int
) -> list[Output]:
    """Every message stored on `subject`, duplicates included, in stream order."""
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        filter_subject=subject,
        inactive_threshold=60.0,
    )
    sub = await js.pull_subscribe(subject, durable=None, stream=stream, config=config)
    try:
        info = await sub.consumer_info()
        remaining = info.num_pending or 0
        batch = max(1, min(1000, READ_BYTES_PER_FETCH // max(message_bytes, 1)))
        outputs: list[Output] = []
        while remaining > 0:
            try:
                msgs = await sub.fetch(min(batch, remaining), timeout=5)
            except nats.errors.TimeoutError:
                raise TimeoutError(f"{remaining} stored outputs could not be read") from None
            outputs.extend(_output(msg.data, msg.metadata.timestamp.timestamp()) for msg in msgs)
            remaining -= len(msgs)
        return outputs
    finally:
        await sub.unsubscribe()


def _output(data: bytes, stored_at: float) -> Output:
    try:
        envelope = KreNatsMessage.FromString(decompress(data))
    except Exception as exc:  # counted as an error, never fatal
        return Output("", stored_at, f"unreadable output: {exc}", None)
    crc = None
    if envelope.HasField("payload"):
        value = BytesValue()
        if envelope.payload.Unpack(value):
            crc = zlib.crc32(value.value)
    return Output(envelope.tracking_id, stored_at, envelope.error, crc)


def tally(expected: dict[str, int], outputs: list[Output]) -> Tally:
    counts = Counter(o.tracking_id for o in outputs)
    errors = sum(
        1
        for o in outputs
        if o.error or o.tracking_id not in expected or o.payload_crc != expected[o.tracking_id]
    )
    return Tally(
        lost=sum(1 for tracking_id in expected if tracking_id not in counts),
        duplicated=sum(n - 1 for n in counts.values() if n > 1),
        errors=errors,
    )


def drain_rate(outputs: list[Output], started: float) -> tuple[float | None, float]:
    """(outputs per second from `started` to the last stored output, that last time).

    `started` is when the consumer could first fetch: the backlog was already there.
    """
    if not outputs:
        return None, started
    last = max(o.stored_at for o in outputs)
    return (len(outputs) / (last - started) if last > started else None), last
