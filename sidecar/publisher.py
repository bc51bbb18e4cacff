"""Everything this node publishes to JetStream, each publish awaited to its PubAck.

Outputs, error envelopes and early replies carry `Nats-Msg-Id: <stream>:<seq>:<node>`
(early replies add `:early`), so a redelivered input whose output already landed makes
no second one within the stream's duplicate window. Dead letters carry their own
`Kre-Dlq-*` headers. The publish metrics are counted here, once per publish.
"""

from __future__ import annotations

import logging
import time

from nats.js import JetStreamContext
from nats.js.api import PubAck

from sidecar import envelope, metrics
from sidecar.pubacks import PubAcks

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT = 5.0


class Publisher:
    """`publish(kind, subject, data, seq)` for envelopes, `dead_letter(...)` for dead letters."""

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        node_name: str,
        pub_acks: PubAcks | None = None,
    ) -> None:
        self._js = js
        self._pub_acks = pub_acks  # without one (tests of other parts): js.publish
        self._id_prefix = f"{stream}:"
        self._id_suffix = f":{node_name}"

    def msg_id(self, seq: int) -> str:
        """The Nats-Msg-Id of what this node publishes for stream sequence `seq`."""
        return f"{self._id_prefix}{seq}{self._id_suffix}"

    async def publish(self, kind: str, subject: str, data: bytes, msg_id: str) -> None:
        """Publish one envelope (`kind`: output, error, early_reply) and await its PubAck."""
        clock = time.perf_counter()
        ack = await self._acked(subject, data, {"Nats-Msg-Id": msg_id})
        metrics.PUBLISH_SECONDS.observe(time.perf_counter() - clock)
        metrics.BYTES_OUT.inc(len(data))
        if envelope.is_compressed(data):
            metrics.COMPRESSED.inc()
        metrics.published(kind).inc()
        if ack.duplicate:
            log.debug("publish %s was a duplicate: an earlier attempt had landed", msg_id)

    async def dead_letter(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        """Publish a dead letter; counted once, however often a retry repeats it."""
        ack = await self._acked(subject, data, headers)
        if not ack.duplicate:
            metrics.published("dead_letter").inc()

    async def _acked(self, subject: str, data: bytes, headers: dict[str, str]) -> PubAck:
        if self._pub_acks is not None:
            return await self._pub_acks.publish(subject, data, headers, PUBLISH_TIMEOUT)
        return await self._js.publish(subject, data, timeout=PUBLISH_TIMEOUT, headers=headers)
