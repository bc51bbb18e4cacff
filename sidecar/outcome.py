"""What happens to each input message: decided here, and only here.

`decide(happened, facts, policy)` is a pure function from what happened to the
message to exactly one Action. The consumer carries the action out (publish,
await the PubAck, then ack / nak / term) and comes back here once more only when
that publish fails. Every ending of every message is in this file:

| what happened                          | action                                        |
|----------------------------------------|-----------------------------------------------|
| handler returned a message             | PublishThenAck(output envelope)               |
| handler returned None                  | Ack                                           |
| last node, message already replied     | Ack, nothing published (KRE's rule)           |
| handler raised                         | PublishErrorThenAck(error envelope)           |
| output too large even gzipped          | PublishErrorThenAck(error envelope)           |
| handler raised a retryable error       | Nak(backoff); at the last attempt DeadLetter  |
| handler host unreachable, stream broke | Nak(backoff); at the last attempt DeadLetter  |
| publish failed                         | Nak(backoff); at the last attempt DeadLetter  |
| input cannot be decoded                | DeadLetterAndTerm(error envelope)             |

Outputs and error envelopes are published to KRT_NATS_OUTPUT (errors travel where the
output would have gone); early replies go to KRT_NATS_ENTRYPOINT_SUBJECT.
Backoff is `KRT_NAK_DELAY * 2**(attempt-1)`, capped at MAX_NAK_DELAY. The consumer's
`max_deliver` is KRT_MAX_DELIVER, so a nak at the last attempt would drop the message
silently; at that attempt every retryable ending becomes a visible dead letter
instead: an error envelope is published and the input is terminated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from google.protobuf import any_pb2

from protos.kre_nats_msg_pb2 import KreNatsMessage
from sidecar import envelope
from sidecar.errors import PayloadTooLargeError
from sidecar.settings import SidecarSettings

MAX_NAK_DELAY = 60.0
# An error envelope carries the message, not a novel: long texts are cut.
MAX_ERROR_CHARS = 16 * 1024


# What happened to the message.


@dataclass(frozen=True)
class Returned:
    """The handler returned: a payload to publish, or None."""

    payload: any_pb2.Any | None
    start: datetime
    end: datetime


@dataclass(frozen=True)
class Raised:
    """The handler raised (or the sidecar refused what it produced)."""

    message: str
    type: str = ""
    retryable: bool = False


@dataclass(frozen=True)
class Unavailable:
    """The handler host could not be reached, went away, or the stream broke."""

    reason: str


@dataclass(frozen=True)
class BadInput:
    """The input bytes are not a KRE envelope."""

    reason: str


@dataclass(frozen=True)
class PublishFailed:
    """Publishing the output (or an early reply) to JetStream failed."""

    reason: str


Happened = Returned | Raised | Unavailable | BadInput | PublishFailed


# The facts about the message and the policy that the decision depends on.


@dataclass(frozen=True)
class Facts:
    request: KreNatsMessage | None  # None when the input could not be decoded
    attempt: int  # 1 on the first delivery
    early_replied: bool = False  # this node already sent an early reply for it

    @property
    def replied(self) -> bool:
        return self.early_replied or (self.request is not None and self.request.replied)

    @property
    def tracking_id(self) -> str:
        return self.request.tracking_id if self.request is not None else ""


@dataclass(frozen=True)
class Policy:
    node_name: str
    output_subject: str
    error_subject: str
    is_last_node: bool = False
    max_deliver: int = 5
    nak_delay: float = 1.0
    max_payload_bytes: int = 1024 * 1024

    @classmethod
    def from_settings(cls, settings: SidecarSettings) -> Policy:
        return cls(
            node_name=settings.node_name,
            output_subject=settings.nats_output,
            # Error envelopes travel where the output would have gone, so the next node
            # (or, from the last node, the entrypoint) sees the failure in order.
            error_subject=settings.nats_output,
            is_last_node=settings.is_last_node,
            max_deliver=settings.max_deliver,
            nak_delay=settings.nak_delay,
            max_payload_bytes=settings.max_payload_bytes,
        )

    def backoff(self, attempt: int) -> float:
        return min(self.nak_delay * 2 ** max(attempt - 1, 0), MAX_NAK_DELAY)


# The actions. `outcome` is the label counted in the metrics.


@dataclass(frozen=True)
class PublishThenAck:
    subject: str
    envelope: KreNatsMessage
    data: bytes
    outcome: str = "published"


@dataclass(frozen=True)
class Ack:
    reason: str
    outcome: str = "acked"


@dataclass(frozen=True)
class PublishErrorThenAck:
    subject: str
    envelope: KreNatsMessage
    data: bytes
    outcome: str = "error_published"


@dataclass(frozen=True)
class Nak:
    delay: float
    reason: str
    outcome: str = "retried"


@dataclass(frozen=True)
class DeadLetterAndTerm:
    reason: str
    subject: str = ""
    envelope: KreNatsMessage | None = None  # None: nothing to publish, only term
    data: bytes = field(default=b"", repr=False)
    outcome: str = "dead_lettered"


Action = PublishThenAck | Ack | PublishErrorThenAck | Nak | DeadLetterAndTerm


def decide(happened: Happened, facts: Facts, policy: Policy) -> Action:
    """The one decision: what to do with the message, given what happened."""
    match happened:
        case Returned(payload=None):
            return Ack("the handler returned None")
        case Returned():
            return _output(happened, facts, policy)
        case Raised(retryable=False):
            return _error(happened.message, facts, policy)
        case Raised():
            return _retry(f"retryable error: {happened.message}", facts, policy)
        case Unavailable(reason=reason):
            return _retry(f"handler host unavailable: {reason}", facts, policy)
        case PublishFailed(reason=reason):
            return _retry(f"publish failed: {reason}", facts, policy)
        case BadInput(reason=reason):
            return _dead_letter(f"bad input: {reason}", facts, policy)
    raise TypeError(f"unknown happening: {happened!r}")


def _already_replied(facts: Facts, policy: Policy) -> bool:
    # KRE: the last node publishes nothing for a message the entrypoint already has an
    # answer for (the input says replied, or this node sent an early reply).
    return policy.is_last_node and facts.replied


def _output(returned: Returned, facts: Facts, policy: Policy) -> Action:
    if _already_replied(facts, policy):
        return Ack("last node and the message was already replied", outcome="skipped_replied")
    assert facts.request is not None and returned.payload is not None
    output = envelope.build_output(
        facts.request, policy.node_name, returned.payload, returned.start, returned.end
    )
    if facts.early_replied:
        output.replied = True
    try:
        data = envelope.encode(output, policy.max_payload_bytes)
    except PayloadTooLargeError as exc:
        return _error(str(exc), facts, policy)
    return PublishThenAck(policy.output_subject, output, data)


def _error(message: str, facts: Facts, policy: Policy) -> Action:
    if _already_replied(facts, policy):
        return Ack(f"last node, already replied; not publishing: {message}", "skipped_replied")
    error = _error_envelope(message, facts, policy)
    return PublishErrorThenAck(policy.error_subject, error, error.SerializeToString())


def _retry(reason: str, facts: Facts, policy: Policy) -> Action:
    if facts.attempt < policy.max_deliver:
        return Nak(policy.backoff(facts.attempt), reason)
    return _dead_letter(f"gave up after {facts.attempt} attempts: {reason}", facts, policy)


def _dead_letter(reason: str, facts: Facts, policy: Policy) -> DeadLetterAndTerm:
    if _already_replied(facts, policy):
        return DeadLetterAndTerm(reason)
    error = _error_envelope(reason, facts, policy)
    return DeadLetterAndTerm(reason, policy.error_subject, error, error.SerializeToString())


def _error_envelope(message: str, facts: Facts, policy: Policy) -> KreNatsMessage:
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS] + "... (cut)"
    return envelope.build_error(facts.request, facts.tracking_id, policy.node_name, message)
