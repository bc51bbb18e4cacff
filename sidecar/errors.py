"""The sidecar's errors: one base class, subclasses that say what to do."""

from __future__ import annotations

from collections.abc import Sequence


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
