"""One request at a time: publish an input, wait for its output, publish the next.

Latency is end to end: from just before the JetStream publish of the input to the
moment the output reaches a core NATS subscriber of the output subject (the arrival
time is taken before the reply is parsed). Lost and duplicated outputs are counted
from the stream afterwards, like every other case.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from deploy.local.client import decompress
from protos.kre_nats_msg_pb2 import KreNatsMessage

REPLY_TIMEOUT = 10.0


async def one_at_a_time(
    nc: Client,
    js: JetStreamContext,
    input_subject: str,
    output_subject: str,
    messages: Iterable[tuple[str, bytes]],
    warmup: int = 0,
    healthy: Callable[[], None] | None = None,
) -> tuple[list[float], float, float]:
    """Latencies in seconds of every message after the first `warmup`, and the epoch
    times the measured part started and ended (for the CPU window).

    A reply that does not come within REPLY_TIMEOUT is left to the stream's count
    (lost); `healthy` is called then, and raises to end the run when the node broke."""
    waiting: dict[str, asyncio.Future[float]] = {}

    async def arrived(msg: Msg) -> None:
        at = time.perf_counter()
        tracking_id = KreNatsMessage.FromString(decompress(msg.data)).tracking_id
        future = waiting.pop(tracking_id, None)
        if future is not None and not future.done():
            future.set_result(at)

    sub = await nc.subscribe(output_subject, cb=arrived)
    await nc.flush()
    latencies: list[float] = []
    started = ended = time.time()
    loop = asyncio.get_running_loop()
    try:
        for i, (tracking_id, data) in enumerate(messages):
            if i == warmup:
                started = time.time()
            reply = waiting[tracking_id] = loop.create_future()
            sent = time.perf_counter()
            await js.publish(input_subject, data, timeout=REPLY_TIMEOUT)
            try:
                at = await asyncio.wait_for(reply, REPLY_TIMEOUT)
            except TimeoutError:
                waiting.pop(tracking_id, None)
                if healthy is not None:
                    healthy()
                continue  # shows up as lost in the stream's count
            if i >= warmup:
                latencies.append(at - sent)
        ended = time.time()
    finally:
        await sub.unsubscribe()
    return latencies, started, ended


def percentile(values: list[float], pct: float) -> float | None:
    """The `pct` percentile (nearest rank on the sorted values), or None with no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = math.ceil(pct / 100 * len(ordered))
    return ordered[min(max(rank, 1), len(ordered)) - 1]
