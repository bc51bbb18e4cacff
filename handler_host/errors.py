"""The handler host's errors: what went wrong and what to do about it.

``RunnerError`` is the base of every error the handler host itself raises. Each
subclass keeps the facts as attributes and builds its message from them, so a log
line or a test can read either. ``RetryableError`` is different: user code raises it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType

# Frames from these places are the runner's plumbing, not the user's code: a
# traceback shown to a user starts at the first frame of their own code.
_PLUMBING = (
    str(Path(__file__).resolve().parent),
    str(Path(concurrent.futures.__file__).parent),
    str(Path(asyncio.__file__).parent),
    "<frozen importlib.",
)


class RetryableError(Exception):
    """Raise from ``handler(ctx, data)`` to ask for the message to be delivered again.

    The Result's failure then has ``retryable=True``: the sidecar naks the input
    message with a backoff instead of publishing an error envelope. Use it for
    transient causes (a database that is briefly unreachable), not for bad input.
    """


class RunnerError(Exception):
    """Base of the errors raised by the handler host (not by user code)."""


class SettingsError(RunnerError):
    """Environment variables missing or invalid; every problem is listed at once."""

    def __init__(self, missing: Sequence[str], invalid: Sequence[str]) -> None:
        self.missing = list(missing)
        self.invalid = list(invalid)
        lines = ["the handler host cannot start: its environment is incomplete or wrong"]
        if self.missing:
            lines.append("missing (set them): " + ", ".join(self.missing))
        lines.extend(f"invalid: {problem}" for problem in self.invalid)
        super().__init__("\n  ".join(lines))


class HandlerFileNotFound(RunnerError):
    """KRT_BASE_PATH/KRT_HANDLER_PATH does not name a Python file."""

    def __init__(self, path: Path, base_path: str, handler_path: str, reason: str) -> None:
        self.path = path
        self.base_path = base_path
        self.handler_path = handler_path
        self.reason = reason
        super().__init__(
            f"handler file {str(path)!r} {reason}: it is built from "
            f"KRT_BASE_PATH={base_path!r} and KRT_HANDLER_PATH={handler_path!r}; "
            "check both, and that the user code is mounted in the container"
        )


class HandlerImportError(RunnerError):
    """The handler module was found but raised while being imported."""

    def __init__(self, path: Path, exc: BaseException) -> None:
        self.path = path
        self.cause = exc
        self.traceback = format_user_traceback(exc)
        hint = ""
        if isinstance(exc, ModuleNotFoundError):
            hint = (
                f"\nthe folder of the handler file ({path.parent}) is on sys.path: "
                f"put module {exc.name!r} there or install it in the handler image"
            )
        super().__init__(
            f"the handler module {str(path)!r} raised {type(exc).__name__} while being "
            f"imported: {exc}{hint}\n{self.traceback}"
        )


class MissingHandlerError(RunnerError):
    """The module has no callable ``handler``."""

    def __init__(self, path: Path, found: object | None = None) -> None:
        self.path = path
        self.found = found
        if found is None:
            what = "does not define handler"
        else:
            what = f"defines handler as a {type(found).__name__}, which is not callable"
        super().__init__(
            f"the handler module {str(path)!r} {what}: define "
            "`def handler(ctx, data)` or `async def handler(ctx, data)`"
        )


class InitError(RunnerError):
    """``init(ctx)`` raised; the host never reports SERVING."""

    def __init__(self, path: Path, exc: BaseException) -> None:
        self.path = path
        self.cause = exc
        self.traceback = format_user_traceback(exc)
        super().__init__(
            f"init(ctx) in {str(path)!r} raised {type(exc).__name__}: {exc}\n{self.traceback}"
        )


class BindError(RunnerError):
    """The gRPC server could not listen on KRT_HANDLER_ADDRESS."""

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(
            f"cannot listen on KRT_HANDLER_ADDRESS={address!r}: {reason}; another process "
            "may hold the port, or the socket's folder is not writable"
        )


class ServiceNotConfigured(RunnerError):
    """User code used ``ctx.db``/``ctx.prediction``/``ctx.measurement`` with no service."""

    def __init__(self, attribute: str, env_vars: Iterable[str]) -> None:
        self.attribute = attribute
        self.env_vars = list(env_vars)
        super().__init__(
            f"ctx.{attribute} needs {' and '.join(self.env_vars)}: set it in the handler "
            "host's environment to use this service"
        )


class EarlyReplyError(RunnerError):
    """``ctx.early_reply`` was called where no early reply can be sent."""


class InvalidHandlerResult(RunnerError):
    """The handler returned something that is neither a protobuf message nor None."""

    def __init__(self, value: object) -> None:
        self.value_type = type(value)
        super().__init__(
            f"handler returned a {type(value).__module__}.{type(value).__qualname__}: "
            "return a protobuf message (it is packed into the output payload) or None "
            "(nothing is published)"
        )


def format_user_traceback(exc: BaseException) -> str:
    """Format ``exc`` with its traceback, leaving out the runner's leading frames."""
    tb: TracebackType | None = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PLUMBING):
        tb = tb.tb_next
    # When every frame is plumbing (a SyntaxError found while compiling), keep them all.
    shown = tb if tb is not None else exc.__traceback__
    return "".join(traceback.format_exception(type(exc), exc, shown))
