"""A message's early replies: `await ctx.early_reply(msg)`, published to the entrypoint.

Each reply is KRE's early-reply envelope (tracking carried over, `replied` set), encoded
as outputs are and published with the input's Nats-Msg-Id plus `:early`. What goes
wrong is remembered, not raised: the handler goes on, and the message's ending says it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from google.protobuf import any_pb2

from protos.kre_nats_msg_pb2 import KreNatsMessage
from sidecar import envelope
from sidecar.errors import PUBLISH_ERRORS, PayloadTooLargeError, describe
from sidecar.outcome import Happened, PublishFailed, Raised


@dataclass
class EarlyReplies:
    """Publishes one message's early replies to the entrypoint; remembers what went wrong.

    `publish(data)` is the one publish it needs (None: no entrypoint subject is set).
    """

    request: KreNatsMessage
    publish: Callable[[bytes], Awaitable[None]] | None
    encode: Callable[[KreNatsMessage], Awaitable[bytes]]
    sent: bool = False
    failure: Happened | None = None

    async def send(self, payload: any_pb2.Any) -> None:
        if self.failure is not None:
            return
        if self.publish is None:
            self.failure = Raised("early reply needs KRT_NATS_ENTRYPOINT_SUBJECT, which is not set")
            return
        try:
            await self.publish(await self.encode(envelope.build_early_reply(self.request, payload)))
        except PayloadTooLargeError as exc:
            self.failure = Raised(f"early reply: {exc}")
        except PUBLISH_ERRORS as exc:
            self.failure = PublishFailed(f"early reply: {describe(exc)}")
        else:
            self.sent = True
