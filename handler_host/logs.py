"""The handler host's log lines: text or JSON, each line about a message tagged with it.

``KRT_LOG_FORMAT=text`` (default) writes ``TIME LEVEL LOGGER: MESSAGE``;
``KRT_LOG_FORMAT=json`` writes one JSON object per line with ``ts``, ``level``,
``logger``, ``msg``, ``node``, and for a line about a message ``tracking_id``,
``attempt`` and ``traceparent`` (when the input carried one), plus ``exc_info``.

While a delivery is being handled, ``bind(DeliveryTags(...))`` makes its tags current
(a context variable, so it holds for the delivery's task and what it awaits). The
``MessageFilter`` on the handler copies them onto every record made meanwhile, from
any logger; ``ctx.logger`` puts them on its records itself, so its lines are tagged
from a sync handler's worker thread as well. Payloads are never logged.

Most deliveries log nothing: a ``DeliveryTags`` works its ``MessageTags`` out (cleans
the tracking id, checks the traceparent) only when a line first needs them.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, TypeAlias

from protos import runner_pb2

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")
TRACEPARENT = "traceparent"
TRACKING_ID_HEADER = "kre-tracking-id"

# W3C trace context: version-traceid-parentid-flags, lowercase hex.
_TRACEPARENT_RE = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_MAX_TRACKING_ID_CHARS = 200
# Attributes every LogRecord has: anything else on a record came from ``extra``.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


@dataclass(frozen=True)
class MessageTags:
    """What identifies one delivery in a log line (never its payload)."""

    node: str
    tracking_id: str = ""
    attempt: int = 0  # 0: unknown (the caller did not say)
    traceparent: str = ""

    @classmethod
    def of(
        cls, node: str, tracking_id: str, attempt: int, headers: Mapping[str, str]
    ) -> MessageTags:
        """Tags for a delivery: a missing tracking id is taken from its headers."""
        lowered = {key.lower(): value for key, value in headers.items()}
        tracking = tracking_id or lowered.get(TRACKING_ID_HEADER, "")
        return cls(
            node=node,
            tracking_id=_printable(tracking)[:_MAX_TRACKING_ID_CHARS],
            attempt=attempt,
            traceparent=valid_traceparent(lowered.get(TRACEPARENT, "")),
        )

    def extra(self) -> dict[str, Any]:
        """The record attributes for these tags (``kre_node``, ``kre_tracking_id``...)."""
        extra: dict[str, Any] = {"kre_node": self.node}
        if self.tracking_id:
            extra["kre_tracking_id"] = self.tracking_id
        if self.attempt:
            extra["kre_attempt"] = self.attempt
        if self.traceparent:
            extra["kre_traceparent"] = self.traceparent
        return extra


class DeliveryTags:
    """A delivery's ``MessageTags``, worked out the first time a line needs them.

    Made for every delivery, so making one only copies the fields the tags come from
    (not the delivery: a ctx kept after its message would keep the payload alive).
    """

    __slots__ = ("_attempt", "_headers", "_node", "_tags", "_tracking_id")

    def __init__(self, node: str, delivery: runner_pb2.Delivery) -> None:
        self._node = node
        self._tracking_id = delivery.message.tracking_id
        self._attempt = delivery.attempt
        headers = delivery.headers
        self._headers = dict(headers) if headers else None
        self._tags: MessageTags | None = None

    def resolve(self) -> MessageTags:
        """The tags, worked out on the first call."""
        tags = self._tags
        if tags is None:
            # A sync handler's thread and the loop may both get here: same tags either way.
            tags = MessageTags.of(self._node, self._tracking_id, self._attempt, self._headers or {})
            self._tags = tags
        return tags

    def extra(self) -> dict[str, Any]:
        """``MessageTags.extra()`` of the resolved tags."""
        return self.resolve().extra()


# What ``bind`` takes: tags worked out already, or when first needed.
Tags: TypeAlias = MessageTags | DeliveryTags

_current: contextvars.ContextVar[Tags | None] = contextvars.ContextVar(
    "kre_message_tags", default=None
)


def current_tags() -> Tags | None:
    """The tags of the delivery being handled in this task, if any (see ``extra()``)."""
    return _current.get()


def bind(tags: Tags) -> _Binding:
    """Make ``tags`` current for the code run inside the ``with bind(tags):`` block."""
    return _Binding(tags)


class _Binding:
    # Not a @contextmanager generator: entered for every delivery, where it costs
    # three times as much.
    __slots__ = ("_tags", "_token")

    def __init__(self, tags: Tags) -> None:
        self._tags = tags

    def __enter__(self) -> None:
        self._token = _current.set(self._tags)

    def __exit__(self, *exc_info: object) -> None:
        _current.reset(self._token)


def with_call_metadata(
    delivery: runner_pb2.Delivery, metadata: Sequence[tuple[str, str | bytes]] | None
) -> runner_pb2.Delivery:
    """``delivery`` with the trace headers of a unary call's gRPC metadata added.

    ``traceparent`` and ``kre-tracking-id`` sent as metadata count as Delivery headers
    when the Delivery has none of its own; ``kre-tracking-id`` also fills an empty
    ``message.tracking_id`` (so ``ctx.tracking_id`` is the caller's).
    """
    wanted = {
        key.lower(): value
        for key, value in metadata or ()
        if key.lower() in (TRACEPARENT, TRACKING_ID_HEADER) and isinstance(value, str)
    }
    present = {key.lower() for key in delivery.headers}
    missing = {key: value for key, value in wanted.items() if key not in present}
    fill_tracking = not delivery.message.tracking_id and TRACKING_ID_HEADER in wanted
    if not missing and not fill_tracking:
        return delivery
    updated = runner_pb2.Delivery()
    updated.CopyFrom(delivery)
    updated.headers.update(missing)
    if fill_tracking:
        updated.message.tracking_id = wanted[TRACKING_ID_HEADER]
    return updated


def valid_traceparent(value: str) -> str:
    """``value`` if it is a W3C traceparent, else "" (nothing unchecked reaches a log)."""
    value = value.strip().lower()
    return value if _TRACEPARENT_RE.match(value) else ""


def tag_prefix(extra: Mapping[str, Any]) -> str:
    """``[node=N tracking_id=T attempt=A trace_id=X]``, with the parts that are known."""
    parts = [f"node={extra['kre_node']}"]
    if extra.get("kre_tracking_id"):
        parts.append(f"tracking_id={extra['kre_tracking_id']}")
    if extra.get("kre_attempt"):
        parts.append(f"attempt={extra['kre_attempt']}")
    if extra.get("kre_traceparent"):
        parts.append(f"trace_id={extra['kre_traceparent'][3:35]}")
    return "[" + " ".join(parts) + "]"


class MessageFilter(logging.Filter):
    """Copies the current delivery's tags onto each record that lacks them."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def filter(self, record: logging.LogRecord) -> bool:
        tags = _current.get()
        if tags is not None:
            for key, value in tags.extra().items():
                if not hasattr(record, key):
                    setattr(record, key, value)
        return True


class TextFormatter(logging.Formatter):
    """The classic line; a line about a message starts with its tags."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        # ctx.logger already wrote the tags into its message (``kre_prefix``).
        if hasattr(record, "kre_node") and not hasattr(record, "kre_prefix"):
            record.message = f"{tag_prefix(record.__dict__)} {record.message}"
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``node`` on every line."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        prefix = getattr(record, "kre_prefix", "")
        if prefix and message.startswith(prefix):
            message = message[len(prefix) :].lstrip()
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": message,
            "node": getattr(record, "kre_node", self.node),
        }
        for key in ("tracking_id", "attempt", "traceparent"):
            value = getattr(record, f"kre_{key}", None)
            if value:
                line[key] = value
        for key, value in record.__dict__.items():  # the caller's own ``extra``
            if key not in _RECORD_ATTRS and not key.startswith("kre_") and key not in line:
                line[key] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure(
    log_format: str = "text",
    level: str | int = "INFO",
    *,
    node: str = "handler",
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Send the root logger's lines to ``stream`` (stderr) in ``log_format``.

    Replaces the handlers this function installed before (settings are read after the
    first lines are logged), leaves other handlers alone.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name("kre-handler-host")
    handler.addFilter(MessageFilter(node))
    formatter: logging.Formatter = JsonFormatter(node) if log_format == "json" else TextFormatter()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "kre-handler-host"]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def format_from_env(env: Mapping[str, str]) -> tuple[str, str]:
    """KRT_LOG_FORMAT and KRT_LOG_LEVEL read leniently, for the lines before the settings."""
    log_format = env.get("KRT_LOG_FORMAT", "").strip().lower()
    level = env.get("KRT_LOG_LEVEL", "").strip().upper()
    if log_format not in LOG_FORMATS:
        log_format = "text"
    if not isinstance(logging.getLevelNamesMapping().get(level), int):
        level = "INFO"
    return log_format, level


def _printable(text: str) -> str:
    # A tracking id comes from the wire: no newlines or control characters in a log line.
    if text.isprintable():  # nearly always: no per-character copy
        return text
    return "".join(c if c.isprintable() else "?" for c in text)
