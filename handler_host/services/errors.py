"""Errors raised by the context data services (``ctx.db``, ``ctx.prediction``,
``ctx.measurement``).

Each error keeps its facts as attributes and builds its message from them. The
messages follow KRE's style, so handlers and log searches written against KRE still
match: ``[ctx.db.save] invalid 'collection'='', must be a nonempty string``.
"""

from __future__ import annotations

import reprlib

from handler_host.errors import RunnerError

_SHORT = reprlib.Repr()
_SHORT.maxstring = 60
_SHORT.maxother = 60
_SHORT.maxdict = 4
_SHORT.maxlist = 4


def short_repr(value: object) -> str:
    """``repr(value)`` cut to a size fit for one log line (a 1 MB string stays short)."""
    return _SHORT.repr(value)


class ServiceError(RunnerError):
    """Base of the errors raised by ``ctx.db``, ``ctx.prediction`` and ``ctx.measurement``."""


class ServiceArgumentError(ServiceError, ValueError):
    """A service method was called with an invalid argument; nothing was stored.

    ``method`` is what user code called (``ctx.db.save``), ``argument`` the parameter
    name as the KRE README spells it, ``value`` what was passed, ``requirement`` what
    would have been accepted.
    """

    def __init__(self, method: str, argument: str, value: object, requirement: str) -> None:
        self.method = method
        self.argument = argument
        self.value = value
        self.requirement = requirement
        super().__init__(f"[{method}] invalid '{argument}'={short_repr(value)}, {requirement}")


class StoreError(ServiceError):
    """The store answered with an error (a document too large, a bad query operator).

    Retrying the same call gives the same answer, so this is not retryable.
    """

    def __init__(self, method: str, store: str, detail: str) -> None:
        self.method = method
        self.store = store
        self.detail = detail
        super().__init__(f"[{method}] {store} refused the operation: {detail}")


class StoreUnavailableError(ServiceError):
    """The store could not be reached, or did not answer, within the timeout.

    When a handler lets it escape, the message gets KRE's error envelope at once: a
    down store never holds a message. A handler that would rather have the message
    delivered again later catches it and raises ``RetryableError`` from it.
    """

    def __init__(self, method: str, store: str, timeout_s: float, detail: str) -> None:
        self.method = method
        self.store = store
        self.timeout_s = timeout_s
        self.detail = detail
        super().__init__(
            f"[{method}] {store} did not answer within {timeout_s:g} s "
            f"(KRT_MONGO_TIMEOUT): {detail}"
        )
