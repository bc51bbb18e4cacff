"""The sidecar's errors: one base class, subclasses that say what to do."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import nats.errors

# What a JetStream publish or API request raises when it did not get through: NATS is
# down or slow, the stream refused it, the socket broke. Retrying later may work.
PUBLISH_ERRORS = (nats.errors.Error, asyncio.TimeoutError, OSError)


def describe(exc: BaseException) -> str:
    """An exception as a log line or /readyz status says it: its text, else its class."""
    return str(exc) or type(exc).__name__


class RunnerError(Exception):
    """Base class of every error the sidecar raises on purpose."""


class SettingsError(RunnerError):
    """The environment does not describe a runnable sidecar.

    Lists every missing or invalid variable at once, so one restart fixes them all.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("invalid sidecar settings: " + "; ".join(self.problems))


class BadInputError(RunnerError):
    """An input message cannot be decoded into a KRE envelope. Retrying will not help."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"bad input message: {reason}")


class PayloadTooLargeError(RunnerError):
    """An output envelope is still larger than the limit after gzip (KRE refuses these too).

    `size` is what would have been published (gzipped), `raw_size` the serialized envelope
    before gzip, `limit` the largest message that may be published.
    """

    def __init__(self, size: int, limit: int, raw_size: int | None = None) -> None:
        self.size = size
        self.limit = limit
        self.raw_size = size if raw_size is None else raw_size
        super().__init__(
            f"output envelope is {self.raw_size} bytes, {size} bytes after gzip, over the "
            f"{limit} byte limit (KRT_MAX_PAYLOAD_BYTES, or the NATS server's max_payload)"
        )


class HandlerUnavailable(RunnerError):
    """The handler host cannot take or finish a message right now: retry it later."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"handler host unavailable: {reason}")


class ConsumerConflict(RunnerError):
    """The durable consumer exists with settings the server will not change into ours.

    Typically the push consumer of KRE's own Python runner, or one made by hand: bound
    as it is, it would never deliver to the sidecar. `differences` says in words how it
    differs from the consumer the sidecar needs; `server_said` is the server's refusal.
    """

    def __init__(
        self, stream: str, durable: str, differences: Sequence[str], server_said: str
    ) -> None:
        self.stream = stream
        self.durable = durable
        self.differences = tuple(differences)
        self.server_said = server_said
        found = "; ".join(self.differences) or "no difference the sidecar knows of"
        super().__init__(
            f"consumer {durable} on stream {stream} exists with settings the server will not "
            f"change ({server_said}): {found}. Delete it once no old replica uses it "
            f"(nats consumer rm {stream} {durable}), or set KRT_NATS_DURABLE to a new name"
        )


class SubjectNotCaptured(RunnerError):
    """No stream captures a subject the sidecar must publish to, so some messages cannot end.

    `variable` is the setting that names the subject, `stream` the node's stream and
    `stream_subjects` its subjects, `consequence` what would happen to messages.
    """

    def __init__(
        self,
        variable: str,
        subject: str,
        stream: str,
        stream_subjects: Sequence[str],
        consequence: str,
    ) -> None:
        self.variable = variable
        self.subject = subject
        self.stream = stream
        self.stream_subjects = tuple(stream_subjects)
        self.consequence = consequence
        have = ", ".join(self.stream_subjects) or "none"
        super().__init__(
            f"{variable}={subject} is captured by no stream: {consequence}. Add it to the "
            f"subjects of stream {stream} (now: {have}), or set {variable} to a subject "
            "that a stream captures"
        )


class ConsumerTakenByAnotherInput(ConsumerConflict):
    """The durable consumer exists with another filter: another node's, most likely.

    Two nodes given the same KRT_NATS_DURABLE would otherwise re-point each other's
    consumer to their own input, and one node's messages would go through the other's
    handler. `theirs` is the filter found, `ours` the one this node's inputs need.
    """

    def __init__(
        self, stream: str, durable: str, theirs: Sequence[str], ours: Sequence[str]
    ) -> None:
        self.theirs = tuple(theirs)
        self.ours = tuple(ours)
        found = ", ".join(self.theirs) or "none (every subject of the stream)"
        wanted = ", ".join(self.ours)
        difference = f"filter subjects are {found}, not {wanted}"
        RunnerError.__init__(
            self,
            f"consumer {durable} on stream {stream} takes {found}, not this node's input "
            f"{wanted} (KRT_NATS_INPUT): another node probably has KRT_NATS_DURABLE={durable} "
            "too. Give each node its own KRT_NATS_DURABLE, or delete the consumer if no node "
            f"uses it any more (nats consumer rm {stream} {durable}); it is left as it is",
        )
        self.stream = stream
        self.durable = durable
        self.differences = (difference,)
        self.server_said = ""


class InputNotCaptured(SubjectNotCaptured):
    """The node's stream does not capture an input subject: the consumer would get nothing.

    `elsewhere` is the stream that does capture it, if any: a consumer only reads its
    own stream, so that does not help.
    """

    def __init__(
        self, subject: str, stream: str, stream_subjects: Sequence[str], elsewhere: str | None
    ) -> None:
        self.variable = "KRT_NATS_INPUT"
        self.subject = subject
        self.stream = stream
        self.stream_subjects = tuple(stream_subjects)
        self.elsewhere = elsewhere
        self.consequence = "the consumer would never receive a message"
        have = ", ".join(self.stream_subjects) or "none"
        where = (
            f"is captured by stream {elsewhere}, not by KRT_NATS_STREAM={stream}"
            if elsewhere
            else "is captured by no stream"
        )
        RunnerError.__init__(
            self,
            f"KRT_NATS_INPUT={subject} {where}: {self.consequence}. Add it to the subjects "
            f"of stream {stream} (now: {have}), or set KRT_NATS_STREAM to the stream that "
            "captures the input",
        )


class HttpPortUnavailable(RunnerError):
    """The probes' HTTP port cannot be bound: without it the kubelet sees no sidecar.

    `host` and `port` are KRT_HTTP_HOST and KRT_HTTP_PORT, `reason` the system's words.
    """

    def __init__(self, host: str, port: int, reason: str) -> None:
        self.host = host
        self.port = port
        self.reason = reason
        super().__init__(
            f"cannot serve /healthz, /readyz and /metrics on {host}:{port} "
            f"(KRT_HTTP_HOST, KRT_HTTP_PORT): {reason}. Stop what holds the port, or set "
            "KRT_HTTP_PORT to a free one (and the probes' port with it)"
        )
