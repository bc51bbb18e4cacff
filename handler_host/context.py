"""The ``ctx`` that user code receives: KRE's API, exactly, plus a logger.

One shared ``Context`` is built at start and handed to ``init(ctx)``; each message gets
a cheap ``MessageContext`` view of it that adds the tracking id, a logger that tags its
lines with it, ``early_reply`` and ``early_exit``.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Protocol

from google.protobuf import any_pb2
from google.protobuf.message import Message

from handler_host.errors import EarlyReplyError, ServiceNotConfigured
from handler_host.logs import current_tags, tag_prefix

if TYPE_CHECKING:
    from handler_host.settings import HostSettings

logger = logging.getLogger(__name__)

EmitEarly = Callable[[any_pb2.Any], Awaitable[None]]

# Which variable turns each data service on: the message of ServiceNotConfigured.
SERVICE_ENV = {
    "db": ("KRT_MONGO_URI",),
    "prediction": ("KRT_MONGO_URI",),
    "measurement": ("KRT_INFLUX_URI",),
}
USER_LOGGER = "kre.user"


class ContextServices(Protocol):
    """What ``handler_host.services`` plugs into the Context.

    Any object with the attributes ``db``, ``prediction`` and ``measurement`` will do;
    an attribute that is missing or None means "not configured", and ``ctx.<name>``
    then raises ServiceNotConfigured naming the variable to set. If the object has an
    ``aclose()`` or ``close()`` (sync or async), ``Context.aclose()`` calls it at
    shutdown. ``handler_host.services.Services`` is the real one.
    """

    db: Any
    prediction: Any
    measurement: Any


class ContextPath(str):
    """An absolute path under KRT_BASE_PATH: a plain ``str`` that can also be read.

    KRE's README writes ``pickle.load(ctx.path("data/categories.pkl"))``, which hands a
    path to a function that wants a binary file. To keep that code working as written,
    a ContextPath is an ordinary path string (``open()``, ``os.path``, ``Path()``,
    string operations and iteration all work as on any ``str``) that also has the
    methods of a read-only binary file: ``read``, ``readline``, ``readlines``,
    ``readinto``, ``peek``, ``seek``, ``tell``, ``fileno``, ``close``... The first of
    them opens the file (``"rb"``); later calls go on from where the last one stopped.
    The file is closed by ``close()`` or when the object is garbage collected (right
    after ``pickle.load(ctx.path(...))`` returns). Each ``ctx.path()`` call returns a
    new object, which reads from the start of the file.

    Libraries that look for a ``read`` method before treating their argument as a path
    (``numpy.load``, ``joblib.load``, ``h5py.File``) therefore get a seekable binary
    file, as if the caller had written ``open(path, "rb")``.

    New code should prefer ``with open(ctx.path(...), "rb") as f: pickle.load(f)``.
    """

    _file: io.BufferedReader | None = None
    _closed: bool = False

    @property
    def name(self) -> str:
        return str(self)

    @property
    def mode(self) -> str:
        return "rb"

    @property
    def closed(self) -> bool:
        return self._closed

    def read(self, size: int | None = -1) -> bytes:
        return self._stream().read(size)

    def read1(self, size: int = -1) -> bytes:
        return self._stream().read1(size)

    def readline(self, size: int | None = -1) -> bytes:
        return self._stream().readline(size)

    def readlines(self, hint: int = -1) -> list[bytes]:
        return self._stream().readlines(hint)

    def readinto(self, buffer: Any) -> int:
        return self._stream().readinto(buffer)

    def peek(self, size: int = 0) -> bytes:
        return self._stream().peek(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._stream().seek(offset, whence)

    def tell(self) -> int:
        return self._stream().tell()

    def fileno(self) -> int:
        return self._stream().fileno()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        """Close the file the read methods opened, if they opened one."""
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None

    def _stream(self) -> io.BufferedReader:
        if self._closed:
            raise ValueError(f"I/O operation on closed file {str(self)!r}")
        if self._file is None:
            # str(self): the file's name must not refer back to this object (a cycle
            # would keep the file open until the garbage collector runs).
            self._file = open(str(self), "rb")
        return self._file

    def __del__(self) -> None:
        if self._file is not None:
            self._file.close()

    def __reduce__(self) -> tuple[type[ContextPath], tuple[str]]:
        # Copies and pickles carry the path only, never the open file.
        return ContextPath, (str(self),)


class ContextLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the node name (and, per message, the tracking id, the
    delivery attempt and the trace id when known).

    The same values are in the record's ``extra`` (``kre_node``, ``kre_tracking_id``,
    ``kre_attempt``, ``kre_traceparent``) for structured formatters, and the prefix
    itself as ``kre_prefix`` (the JSON formatter takes it off the message).
    """

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})
        prefix = tag_prefix(extra)
        extra["kre_prefix"] = prefix
        kwargs["extra"] = extra
        return f"{prefix} {msg}", kwargs


class Context:
    """The shared ctx: built once, given to ``init(ctx)``, behind every message's ctx.

    KRE's API: ``path``, ``get``, ``set``, ``db``, ``prediction``, ``measurement``;
    plus ``logger`` and the node/workflow/version names. ``get`` and ``set`` share one
    store for the whole process, so what ``init`` sets every message can get. Other
    attributes set on it in ``init`` (``ctx.model = ...``) are visible in the handler.
    """

    tracking_id: str | None = None

    def __init__(
        self,
        base_path: str,
        *,
        node_name: str = "handler",
        workflow_name: str = "",
        version_id: str = "",
        version: str = "",
        is_last_node: bool = False,
        services: ContextServices | None = None,
    ) -> None:
        self.base_path = os.path.abspath(base_path)
        self.node_name = node_name
        self.workflow_name = workflow_name
        self.version_id = version_id
        self.version = version
        self.is_last_node = is_last_node
        self.services = services
        self.logger = ContextLogger(logging.getLogger(USER_LOGGER), {"kre_node": node_name})
        self._values: dict[str, Any] = {}

    @classmethod
    def from_settings(
        cls, settings: HostSettings, services: ContextServices | None = None
    ) -> Context:
        return cls(
            settings.base_path,
            node_name=settings.node_name,
            workflow_name=settings.workflow_name,
            version_id=settings.version_id,
            version=settings.version,
            is_last_node=settings.is_last_node,
            services=services,
        )

    def path(self, relative_path: str) -> ContextPath:
        """The absolute path of ``relative_path`` under KRT_BASE_PATH (see ContextPath)."""
        return ContextPath(os.path.join(self.base_path, relative_path))

    def get(self, label: str) -> Any:
        """The value stored under ``label`` by ``set``, or None (as KRE) if there is none."""
        return self._values.get(label)

    def set(self, label: str, value: Any) -> None:
        """Store ``value`` under ``label`` for the life of the process."""
        self._values[label] = value

    @property
    def db(self) -> Any:
        return self._service("db")

    @property
    def prediction(self) -> Any:
        return self._service("prediction")

    @property
    def measurement(self) -> Any:
        return self._service("measurement")

    async def early_reply(self, msg: Message) -> None:
        raise EarlyReplyError(
            "ctx.early_reply only works inside handler(ctx, data): init(ctx) has no "
            "message to reply to"
        )

    def early_exit(self) -> None:
        raise EarlyReplyError(
            "ctx.early_exit only works inside handler(ctx, data): init(ctx) has no "
            "message to end the workflow for"
        )

    def for_message(
        self, tracking_id: str, *, replied: bool, emit_early: EmitEarly
    ) -> MessageContext:
        """The per-message view handed to ``handler(ctx, data)``."""
        return MessageContext(self, tracking_id, replied=replied, emit_early=emit_early)

    async def aclose(self) -> None:
        """Close the data services (their ``aclose()`` or ``close()``, sync or async)."""
        close = getattr(self.services, "aclose", None) or getattr(self.services, "close", None)
        if close is not None:
            result = close()
            if inspect.isawaitable(result):
                await result

    def _service(self, name: str) -> Any:
        client = getattr(self.services, name, None)
        if client is None:
            raise ServiceNotConfigured(name, SERVICE_ENV[name])
        return client


class MessageContext:
    """One message's ctx: the shared Context plus tracking id, logger, early reply and exit.

    Everything not defined here (``path``, ``get``, ``set``, the data services, and any
    attribute ``init`` put on the shared ctx) is the shared Context's.
    """

    def __init__(
        self, shared: Context, tracking_id: str, *, replied: bool, emit_early: EmitEarly
    ) -> None:
        self.shared = shared
        self.tracking_id = tracking_id
        # The dispatcher made the delivery's tags current (attempt, traceparent): they
        # go into the logger itself, so that its lines carry them from a worker thread.
        # The logger is built when first used: most handlers never log.
        self._tags = current_tags()
        self._tracking_tag = tracking_id  # as given, whatever ctx.tracking_id becomes
        self._logger: ContextLogger | None = None
        self._input_replied = replied
        self._early_replied = False
        self._finished = False
        self._emit_early = emit_early
        self.exited_early = False

    def path(self, relative_path: str) -> ContextPath:
        return self.shared.path(relative_path)

    def get(self, label: str) -> Any:
        return self.shared.get(label)

    def set(self, label: str, value: Any) -> None:
        self.shared.set(label, value)

    @property
    def db(self) -> Any:
        return self.shared.db

    @property
    def prediction(self) -> Any:
        return self.shared.prediction

    @property
    def measurement(self) -> Any:
        return self.shared.measurement

    @property
    def logger(self) -> ContextLogger:
        """The shared logger, with this message's tags on every line."""
        if self._logger is None:
            extra = self._tags.extra() if self._tags is not None else {}
            extra["kre_node"] = self.shared.node_name
            if self._tracking_tag:
                extra["kre_tracking_id"] = self._tracking_tag
            self._logger = ContextLogger(self.shared.logger.logger, extra)
        return self._logger

    @logger.setter
    def logger(self, value: ContextLogger) -> None:
        self._logger = value

    def __getattr__(self, name: str) -> Any:
        # Only reached for names this view lacks: node_name, base_path, user attributes.
        if name == "shared":  # not set yet (a copy being built): avoid endless recursion
            raise AttributeError(name)
        return getattr(self.shared, name)

    def early_reply(self, msg: Message) -> Awaitable[None]:
        """Send ``msg`` now as the reply to the request, before the handler returns.

        Usage: ``await ctx.early_reply(msg)``. One per message, and none when the input
        envelope says an earlier node already replied; both raise EarlyReplyError.
        It only works from an ``async def`` handler: a sync handler runs in a worker
        thread with no event loop, and calling it there raises EarlyReplyError.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise EarlyReplyError(
                "ctx.early_reply must be awaited from an async handler: declare "
                "`async def handler(ctx, data)` and `await ctx.early_reply(msg)`"
            ) from None
        return self._send_early_reply(msg)

    def early_exit(self) -> None:
        """End the workflow at this node: the handler's output goes to the entrypoint.

        KRE's ``ctx.early_exit()``: the message the handler returns is published to
        ``KRT_NATS_ENTRYPOINT_SUBJECT`` (the caller gets it as the workflow's reply)
        instead of to the next node. Call it from sync or async handlers, before the
        handler returns; calling it twice is the same as once.
        """
        if self._finished:
            raise EarlyReplyError("ctx.early_exit was called after the handler returned")
        self.exited_early = True

    def finish(self) -> None:
        """Called by the dispatcher once the handler has returned: no more early replies."""
        self._finished = True

    async def _send_early_reply(self, msg: Message) -> None:
        if self._finished:
            raise EarlyReplyError("ctx.early_reply was called after the handler returned")
        if self._input_replied:
            raise EarlyReplyError(
                "this message was already replied to by an earlier node (its envelope "
                "has replied=true): a request gets one reply"
            )
        if self._early_replied:
            raise EarlyReplyError(
                "ctx.early_reply was already called for this message: a request gets one reply"
            )
        payload = pack_any(msg)
        self._early_replied = True
        await self._emit_early(payload)


def pack_any(msg: Message) -> any_pb2.Any:
    """``msg`` packed in an Any; an Any is taken as already packed and copied, not nested."""
    if not isinstance(msg, Message):
        raise TypeError(
            f"expected a protobuf message, got a {type(msg).__module__}.{type(msg).__qualname__}"
        )
    packed = any_pb2.Any()
    if isinstance(msg, any_pb2.Any):
        packed.CopyFrom(msg)
    else:
        packed.Pack(msg)
    return packed
