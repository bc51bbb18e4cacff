"""Binding the durable consumer: how it is created or found, and whether subjects are captured.

Before it fetches, the consumer loop (`sidecar.consumer`) creates the durable pull
consumer, or updates an existing one to the sidecar's settings (`ensure_consumer`), then
checks that the node's stream captures its inputs and that streams capture the subjects
the sidecar publishes to (`check_subjects`). What stops it is typed and says what to do:
ConsumerConflict when the server will not turn an existing consumer (KRE's own push
consumer, say) into the one the sidecar needs, or when the consumer reads another input
(ConsumerTakenByAnotherInput: another node with the same durable name), and
SubjectNotCaptured when some messages could never arrive or never end. The loop retries both, so an
operator's fix is picked up without a restart. Kept apart from the loop: these are
questions to JetStream about streams and consumers, asked at each bind, not per message.
"""

from __future__ import annotations

import logging

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, ReplayPolicy, RetentionPolicy

from sidecar.errors import (
    PUBLISH_ERRORS,
    ConsumerConflict,
    ConsumerTakenByAnotherInput,
    InputNotCaptured,
    SubjectNotCaptured,
    describe,
)
from sidecar.settings import SidecarSettings

log = logging.getLogger(__name__)

# JetStream's own default; several replicas share the durable consumer.
MIN_MAX_ACK_PENDING = 1000
# What becomes of messages when no stream captures a subject the sidecar publishes to.
MUST_CAPTURE = {
    "KRT_NATS_DLQ_SUBJECT": "a message to dead-letter would be nak'ed and retried forever",
    "KRT_NATS_ENTRYPOINT_SUBJECT": (
        "error envelopes and early replies could not be published, and their messages "
        "would be retried forever"
    ),
}
# The server's error code for a consumer it cannot create or update as asked.
CONSUMER_CREATE_ERR = 10012

# Warnings already given, by (kind, subject): each is given once per process.
Warned = set[tuple[str, str]]


def consumer_config(settings: SidecarSettings) -> ConsumerConfig:
    inputs = list(settings.nats_inputs)
    return ConsumerConfig(
        name=settings.durable,
        durable_name=settings.durable,
        description=f"KRE node {settings.node_name}",
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait,
        # Unlimited: the sidecar counts attempts itself (KRT_MAX_DELIVER) and dead-letters
        # at the last one. JetStream's own limit would drop a message nak'ed because its
        # dead letter could not be published.
        max_deliver=-1,
        max_ack_pending=max(settings.max_in_flight, MIN_MAX_ACK_PENDING),
        filter_subject=inputs[0] if len(inputs) == 1 else None,
        filter_subjects=inputs if len(inputs) > 1 else None,
    )


async def ensure_consumer(js: JetStreamContext, settings: SidecarSettings) -> None:
    """Create the durable consumer, or update an existing one to our settings.

    An existing consumer with another filter is left alone: the server would re-point it
    to our input without a word, taking it from the node (same KRT_NATS_DURABLE) that
    reads it; ConsumerTakenByAnotherInput says so. The server refuses some updates (push
    to pull, deliver, ack or replay policy) and then changes nothing at all: such a
    consumer is not ours to use either, and ConsumerConflict says how it differs and
    what to do.
    """
    stream, durable = settings.nats_stream, settings.durable
    config = consumer_config(settings)
    try:
        existing = await js.consumer_info(stream, durable)
    except nats.js.errors.NotFoundError:
        pass  # created below (or the stream is missing, which add_consumer says)
    else:
        theirs, ours = _filters(existing.config), _filters(config)
        if set(theirs) != set(ours):
            raise ConsumerTakenByAnotherInput(stream, durable, theirs, ours)
    try:
        await js.add_consumer(stream, config=config)
        return
    except (nats.js.errors.BadRequestError, nats.js.errors.ServerError) as exc:
        refused = exc
    try:
        info = await js.consumer_info(stream, durable)
    except nats.js.errors.NotFoundError:
        raise refused from None  # no consumer to conflict with: another failure
    differences = consumer_differences(info.config, config)
    if not differences and refused.err_code != CONSUMER_CREATE_ERR:
        raise refused
    raise ConsumerConflict(stream, durable, differences, refused.description or describe(refused))


async def consumer_gone(js: JetStreamContext, settings: SidecarSettings) -> bool:
    """The stream says the durable consumer does not exist (not: no answer)."""
    try:
        await js.consumer_info(settings.nats_stream, settings.durable)
    except nats.js.errors.NotFoundError:
        return True
    except PUBLISH_ERRORS:
        pass  # no answer: JetStream is restarting, the consumer may well be there
    return False


async def check_subjects(js: JetStreamContext, settings: SidecarSettings, warned: Warned) -> None:
    """Check that the node's stream captures its inputs, and streams what it publishes.

    An input the node's stream does not capture: the consumer, which reads only that
    stream, would wait forever for messages stored elsewhere or nowhere, looking ready
    (InputNotCaptured). No stream for the dead-letter or the entrypoint subject: some
    messages could never end (SubjectNotCaptured). Either way the sidecar does not
    fetch. No stream for the output subject: a warning. The node's stream is looked at
    first, then JetStream is asked.
    """
    info = await js.stream_info(settings.nats_stream)
    own = list(info.config.subjects or [])
    for subject in settings.nats_inputs:
        if not any(subject_matches(pattern, subject) for pattern in own):
            elsewhere = await _capturing_stream(js, subject, settings.nats_stream, own)
            raise InputNotCaptured(subject, settings.nats_stream, own, elsewhere)
    for variable, subject in (
        ("KRT_NATS_DLQ_SUBJECT", settings.dlq_subject),
        ("KRT_NATS_ENTRYPOINT_SUBJECT", settings.entrypoint_subject),
    ):
        if not subject:
            continue
        stream = await _capturing_stream(js, subject, settings.nats_stream, own)
        if stream is None:
            raise SubjectNotCaptured(
                variable, subject, settings.nats_stream, own, MUST_CAPTURE[variable]
            )
        if variable == "KRT_NATS_DLQ_SUBJECT":
            await _warn_if_dropped(js, stream, subject, warned)
    output = settings.nats_output
    if output and await _capturing_stream(js, output, settings.nats_stream, own) is None:
        _warn_once(
            warned,
            ("output", output),
            "KRT_NATS_OUTPUT=%s is captured by no stream: publishing outputs fails (and "
            "is retried) until a stream captures it",
            output,
        )


async def _capturing_stream(
    js: JetStreamContext, subject: str, own_stream: str, own_subjects: list[str]
) -> str | None:
    """The name of the stream that stores what is published to `subject`; None if none."""
    if any(subject_matches(pattern, subject) for pattern in own_subjects):
        return own_stream
    try:
        return await js.find_stream_name_by_subject(subject)
    except nats.js.errors.NotFoundError:
        return None


async def _warn_if_dropped(js: JetStreamContext, stream: str, subject: str, warned: Warned) -> None:
    """Warn when JetStream would drop dead letters as soon as it stores them.

    An interest-retention stream keeps a message only for the consumers whose filter
    takes it: with none on the dead-letter subject, nothing keeps a dead letter.
    """
    if ("dropped", subject) in warned:
        return
    try:
        info = await js.stream_info(stream)
        if info.config.retention != RetentionPolicy.INTEREST:
            return
        consumers = await js.consumers_info(stream)
    except PUBLISH_ERRORS:
        return  # only advice: asked again at the next bind
    if any(subject_matches(p, subject) for c in consumers for p in _filters(c.config) or [">"]):
        return
    _warn_once(
        warned,
        ("dropped", subject),
        "KRT_NATS_DLQ_SUBJECT=%s is captured by stream %s, whose retention is interest, "
        "and no consumer of that stream takes it: JetStream drops every dead letter as "
        "soon as it is stored. Add a durable consumer with filter subject %s to keep them",
        subject,
        stream,
        subject,
    )


def _warn_once(warned: Warned, key: tuple[str, str], message: str, *args: object) -> None:
    if key not in warned:
        warned.add(key)
        log.warning(message, *args)


def consumer_differences(have: ConsumerConfig, want: ConsumerConfig) -> list[str]:
    """How an existing consumer differs from the one the sidecar needs, in words.

    The updatable settings (ack wait, max deliver) count too: a refused update changes
    nothing, so the consumer would keep them.
    """
    found: list[str] = []
    if have.deliver_subject:
        group = f" and deliver group {have.deliver_group}" if have.deliver_group else ""
        found.append(
            f"it is a push consumer (deliver subject {have.deliver_subject}{group}); "
            "the sidecar needs a pull consumer"
        )
    for label, theirs, ours in (
        ("deliver policy", have.deliver_policy, want.deliver_policy),
        ("ack policy", have.ack_policy, want.ack_policy),
        ("replay policy", have.replay_policy, want.replay_policy or ReplayPolicy.INSTANT),
        ("ack wait", _seconds(have.ack_wait), _seconds(want.ack_wait)),
        ("max deliver", have.max_deliver or -1, want.max_deliver),
    ):
        if _word(theirs) != _word(ours):
            found.append(f"{label} is {_word(theirs)}, not {_word(ours)}")
    if set(_filters(have)) != set(_filters(want)):
        found.append(
            f"filter subjects are {_listed(_filters(have))}, not {_listed(_filters(want))}"
        )
    return found


def _filters(config: ConsumerConfig) -> list[str]:
    return list(
        config.filter_subjects or ([config.filter_subject] if config.filter_subject else [])
    )


def _listed(subjects: list[str]) -> str:
    return ", ".join(subjects) or "none (every subject of the stream)"


def _word(value: object) -> str:
    """An enum's wire value ("new", not "DeliverPolicy.NEW"); -1 reads as unlimited."""
    word = str(getattr(value, "value", value))
    return "unlimited" if word == "-1" else word


def _seconds(value: float | None) -> str:
    return "unset" if value is None else f"{value:g}s"


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, a final `>` one or more."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)
