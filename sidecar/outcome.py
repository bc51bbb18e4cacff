"""What happens to each input message: decided here, and only here.

`decide(happened, facts, policy)` is a pure, cheap function from what happened to the
message to exactly one Action; it builds envelopes but encodes and gzips nothing.
`sidecar.message` carries the action out: it encodes what the action publishes,
publishes it, awaits the PubAck, then acks / naks / terms. When that publish fails, or
the output turns out too large once encoded, it asks `decide` again with what happened
then, and carries out the new action instead. Every ending of every message is here:

| what happened                          | action                                        |
|----------------------------------------|-----------------------------------------------|
| input is an earlier node's error       | PublishErrorThenAck(it, as it is): no handler |
| handler returned a message             | PublishThenAck(output envelope)               |
| ... having called ctx.early_exit()     | PublishThenAck(output, to the entrypoint)     |
| handler returned None                  | Ack                                           |
| last node, message already replied     | Ack, nothing published (KRE's rule)           |
| handler raised (or timed out)          | PublishErrorThenAck(error envelope)           |
| output too large even gzipped          | PublishErrorThenAck(error envelope)           |
| handler raised a retryable error       | Nak(backoff); at the last attempt DeadLetter  |
| handler host unreachable               | Nak(backoff); at the last attempt DeadLetter  |
| host died / stream broke / no Result,  | Nak, not counted: a suspect, tried again      |
|   other messages in the host too       |   alone (`sidecar.isolation`)                 |
| ... the message alone in the host      | Nak(backoff), counted; at the last attempt    |
|                                        |   DeadLetter: it crashed or blocked the host  |
| publish failed                         | Nak(backoff); at the last attempt DeadLetter  |
| input cannot be decoded or sent        | DeadLetterAndTerm, on the first attempt       |
| delivered more than KRT_MAX_DELIVER    | DeadLetterAndTerm, the handler not called     |
| the dead letter could not be published | Nak(backoff): never terminated unpublished    |
| a bug in the sidecar while settling    | Nak(backoff)                                  |
| unfinished when the sidecar stops      | Nak, at once                                  |

A dead letter is: the original input bytes and the reason on the dead-letter subject
(KRT_NATS_DLQ_SUBJECT), then the error envelope (unless KRE's last-node rule says
nothing more goes to the entrypoint), then term. Outputs go to KRT_NATS_OUTPUT. Error
envelopes, this node's and forwarded ones, go to KRT_NATS_ENTRYPOINT_SUBJECT, as KRE's
runners send them since 2022-08: the workflow stops there and the caller gets the
error, while a later node (an older kre-py never reads `error`) never sees it. Early
replies, and the output of a handler that called ctx.early_exit(), go there too.
Backoff is `KRT_NAK_DELAY * 2**(attempt-1)`, capped at MAX_NAK_DELAY. The consumer has
no `max_deliver` of its own (JetStream would drop a message nak'ed at the last attempt
silently): the sidecar counts the attempts, and at the last one every retryable ending
becomes a visible dead letter instead. An attempt counts only when the message could
have caused the failure: JetStream counts every delivery, so the sidecar keeps its own
record of the deliveries that did not count (`Facts.excused`, from
`sidecar.isolation.Suspects`) and compares `Facts.counted` with KRT_MAX_DELIVER.
Each action's `outcome` is counted once, when the message is settled, in
`kre_sidecar_messages_total{outcome}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from google.protobuf import any_pb2

from protos.kre_nats_msg_pb2 import KreNatsMessage
from sidecar import envelope
from sidecar.settings import SidecarSettings

MAX_NAK_DELAY = 60.0
# Bytes kept free for the headers of an output under the NATS server's max_payload.
HEADER_ROOM = 1024
# An error envelope carries the message, not a novel: long texts are cut.
MAX_ERROR_CHARS = 16 * 1024


# What happened to the message.


@dataclass(frozen=True)
class Returned:
    """The handler returned: a payload to publish, or None."""

    payload: any_pb2.Any | None
    start: datetime
    end: datetime
    early_exit: bool = False  # ctx.early_exit(): the output goes to the entrypoint


@dataclass(frozen=True)
class UpstreamError:
    """The input is an error envelope from an earlier node: the handler is not called."""


@dataclass(frozen=True)
class Raised:
    """The handler raised (or the sidecar refused what it produced)."""

    message: str
    type: str = ""
    retryable: bool = False


@dataclass(frozen=True)
class Unavailable:
    """The handler host could not be reached, went away, or the stream broke.

    `in_host`: the message had reached the host when it failed (the host died, the
    stream broke, or no Result came in time), so the message may be what failed it.
    """

    reason: str
    in_host: bool = False


@dataclass(frozen=True)
class BadInput:
    """The input bytes are not a KRE envelope."""

    reason: str


@dataclass(frozen=True)
class PublishFailed:
    """Publishing the output (or an early reply) to JetStream failed."""

    reason: str


@dataclass(frozen=True)
class Exhausted:
    """Delivered more than KRT_MAX_DELIVER times: an earlier attempt ended without an
    outcome (its dead letter failed, or its sidecar stopped), so only dead-letter it."""


@dataclass(frozen=True)
class DeadLetterFailed:
    """Publishing a dead letter (error envelope or dead-letter subject) failed."""

    reason: str


@dataclass(frozen=True)
class SettleFailed:
    """A bug in the sidecar while settling the message: it must still end, and come back."""

    reason: str


@dataclass(frozen=True)
class Abandoned:
    """The sidecar stopped before the message ended: still running after the grace
    period, or fetched and never started."""


Happened = (
    Returned
    | UpstreamError
    | Raised
    | Unavailable
    | BadInput
    | PublishFailed
    | Exhausted
    | DeadLetterFailed
    | SettleFailed
    | Abandoned
)


# The facts about the message and the policy that the decision depends on.


@dataclass(frozen=True)
class Facts:
    request: KreNatsMessage | None  # None when the input could not be decoded
    attempt: int  # 1 on the first delivery (JetStream's count)
    early_replied: bool = False  # this node already sent an early reply for it
    excused: int = 0  # earlier deliveries that did not count (this sidecar's record)
    alone: bool = False  # nothing else was in the handler host beside it

    @property
    def counted(self) -> int:
        """The attempts that count toward KRT_MAX_DELIVER, this one included."""
        return max(self.attempt - self.excused, 1)

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
    dlq_subject: str = ""
    # The largest envelope that may be published; None: max_payload_bytes.
    publish_limit: int | None = None
    entrypoint_subject: str = ""  # early exits; "" when KRT_NATS_ENTRYPOINT_SUBJECT is unset

    @classmethod
    def from_settings(
        cls, settings: SidecarSettings, server_max_payload: int | None = None
    ) -> Policy:
        limit = None
        if server_max_payload:
            # The server refuses (and disconnects) a message whose headers and data are over
            # its max_payload: keep room for the Nats-Msg-Id header.
            limit = min(settings.max_payload_bytes, server_max_payload - HEADER_ROOM)
        return cls(
            node_name=settings.node_name,
            output_subject=settings.nats_output,
            # KRE's runners stop the workflow on an error by sending it to the entrypoint.
            # Without an entrypoint subject, errors go where the output would have gone.
            error_subject=settings.entrypoint_subject or settings.nats_output,
            is_last_node=settings.is_last_node,
            max_deliver=settings.max_deliver,
            nak_delay=settings.nak_delay,
            max_payload_bytes=settings.max_payload_bytes,
            dlq_subject=settings.dlq_subject,
            publish_limit=limit,
            entrypoint_subject=settings.entrypoint_subject,
        )

    def backoff(self, attempt: int) -> float:
        return min(self.nak_delay * 2 ** max(attempt - 1, 0), MAX_NAK_DELAY)


# The actions. `outcome` is the label counted in the metrics.


@dataclass(frozen=True)
class PublishThenAck:
    subject: str
    envelope: KreNatsMessage
    outcome: str = "published"


@dataclass(frozen=True)
class Ack:
    reason: str
    outcome: str = "acked"


@dataclass(frozen=True)
class PublishErrorThenAck:
    subject: str
    envelope: KreNatsMessage
    outcome: str = "error_published"  # or error_forwarded: an earlier node's, as it is


@dataclass(frozen=True)
class Nak:
    """Give the message back to JetStream, redelivered after `delay`.

    `counted`: this delivery counts toward KRT_MAX_DELIVER (False: the sidecar records it
    as excused). `alone_next`: the message runs alone in the handler host from now on.
    """

    delay: float
    reason: str
    outcome: str = "retried"
    counted: bool = True
    alone_next: bool = False


@dataclass(frozen=True)
class DeadLetterAndTerm:
    """Publish the input to `dlq_subject`, then the error envelope (if any), then term."""

    reason: str
    subject: str = ""
    envelope: KreNatsMessage | None = None  # None: no error envelope (last node, replied)
    dlq_subject: str = ""
    outcome: str = "dead_lettered"


Action = PublishThenAck | Ack | PublishErrorThenAck | Nak | DeadLetterAndTerm


def decide(happened: Happened, facts: Facts, policy: Policy) -> Action:
    """The one decision: what to do with the message, given what happened."""
    match happened:
        case Returned(payload=None):
            return Ack("the handler returned None")
        case Returned():
            return _output(happened, facts, policy)
        case UpstreamError():
            return _forward_error(facts, policy)
        case Raised(retryable=False):
            return _error(happened.message, facts, policy)
        case Unavailable(in_host=True):
            return _host_failed(happened.reason, facts, policy)
        case Raised() | Unavailable() | PublishFailed():
            return _retry(_retry_reason(happened), facts, policy)
        case BadInput(reason=reason):
            return _dead_letter(f"bad input: {reason}", facts, policy)
        case Exhausted():
            limit = f"KRT_MAX_DELIVER={policy.max_deliver}"
            return _dead_letter(
                f"gave up after {facts.attempt} deliveries ({limit})", facts, policy
            )
        case DeadLetterFailed() | SettleFailed() | Abandoned():
            return _give_back(happened, facts, policy)
    raise TypeError(f"unknown happening: {happened!r}")


def exhausted(facts: Facts, policy: Policy) -> bool:
    """Delivered more than KRT_MAX_DELIVER times, counting only the attempts that count.

    JetStream's count also holds the deliveries excused as suspects: a message over
    KRT_MAX_DELIVER by that count alone is still run.
    """
    return facts.counted > policy.max_deliver


def _host_failed(reason: str, facts: Facts, policy: Policy) -> Action:
    """The host failed with this message in it: a suspect, or, alone, the culprit."""
    if not facts.alone:
        # Any message in flight may have done it: none is charged; each is tried again
        # alone, and the one that fails the host alone is the culprit.
        why = f"the handler host failed with other messages in flight ({reason})"
        return Nak(
            policy.nak_delay,
            f"{why}: not counted, tried again alone",
            outcome="suspect",
            counted=False,
            alone_next=True,
        )
    counted = facts.counted
    why = f"crashed or blocked the handler host while alone in it ({reason})"
    if counted < policy.max_deliver:
        return Nak(policy.backoff(counted), why, outcome="culprit_retried", alone_next=True)
    limit = f"KRT_MAX_DELIVER={policy.max_deliver}"
    return _dead_letter(f"gave up after {counted} attempts ({limit}): {why}", facts, policy)


def _give_back(
    happened: DeadLetterFailed | SettleFailed | Abandoned, facts: Facts, policy: Policy
) -> Nak:
    """The endings that are not the message's fault: it comes back, nothing published."""
    delay = policy.backoff(facts.counted)
    match happened:
        case DeadLetterFailed(reason=reason):
            # Never term a message whose dead letter did not land: it comes back and the
            # dead letter is tried again (Nats-Msg-Id drops whatever part had landed).
            return Nak(delay, f"dead letter not published: {reason}", "dead_letter_retried")
        case SettleFailed(reason=reason):
            return Nak(delay, f"sidecar error while settling: {reason}", "settle_failed")
        case Abandoned():
            # Another replica (or this one, restarted) takes it at once: nothing failed.
            return Nak(0.0, "unfinished when the sidecar stopped", "abandoned")


def _retry_reason(happened: Raised | Unavailable | PublishFailed) -> str:
    match happened:
        case Raised(message=message):
            return f"retryable error: {message}"
        case Unavailable(reason=reason):
            return f"handler host unavailable: {reason}"
        case PublishFailed(reason=reason):
            return f"publish failed: {reason}"


def _already_replied(facts: Facts, policy: Policy) -> bool:
    # KRE: the last node publishes nothing for a message the entrypoint already has an
    # answer for (the input says replied, or this node sent an early reply).
    return policy.is_last_node and facts.replied


def _output(returned: Returned, facts: Facts, policy: Policy) -> Action:
    if _already_replied(facts, policy):
        return Ack("last node and the message was already replied", outcome="skipped_replied")
    assert facts.request is not None and returned.payload is not None
    subject = policy.output_subject
    if returned.early_exit or facts.request.early_exit:  # kre-py honours either
        if not policy.entrypoint_subject:
            message = "ctx.early_exit needs KRT_NATS_ENTRYPOINT_SUBJECT, which is not set"
            return _error(message, facts, policy)
        subject = policy.entrypoint_subject
    output = envelope.build_output(
        facts.request, policy.node_name, returned.payload, returned.start, returned.end
    )
    if facts.early_replied:
        output.replied = True
    return PublishThenAck(subject, output)


def _forward_error(facts: Facts, policy: Policy) -> Action:
    # An earlier node (an older runner sends errors downstream) failed: its error
    # envelope goes on as it is, straight to the entrypoint, which answers the caller
    # with it; a later node, which might take it for a request, never sees it.
    if _already_replied(facts, policy):
        return Ack("last node, already replied; not forwarding an error", "skipped_replied")
    assert facts.request is not None
    return PublishErrorThenAck(policy.error_subject, facts.request, outcome="error_forwarded")


def _error(message: str, facts: Facts, policy: Policy) -> Action:
    if _already_replied(facts, policy):
        return Ack(f"last node, already replied; not publishing: {message}", "skipped_replied")
    return PublishErrorThenAck(policy.error_subject, _error_envelope(message, facts, policy))


def _retry(reason: str, facts: Facts, policy: Policy) -> Action:
    if facts.counted < policy.max_deliver:
        return Nak(policy.backoff(facts.counted), reason)
    return _dead_letter(f"gave up after {facts.counted} attempts: {reason}", facts, policy)


def _dead_letter(reason: str, facts: Facts, policy: Policy) -> DeadLetterAndTerm:
    dlq = policy.dlq_subject
    if _already_replied(facts, policy):
        return DeadLetterAndTerm(reason, dlq_subject=dlq)
    error = _error_envelope(reason, facts, policy)
    return DeadLetterAndTerm(reason, policy.error_subject, error, dlq_subject=dlq)


def _error_envelope(message: str, facts: Facts, policy: Policy) -> KreNatsMessage:
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS] + "... (cut)"
    return envelope.build_error(facts.request, facts.tracking_id, policy.node_name, message)
