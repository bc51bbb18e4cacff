"""The sidecar's log lines: text or JSON, each line about a message tagged with it.

``KRT_LOG_FORMAT=text`` (default) writes ``TIME LEVEL LOGGER: [node=.. tracking_id=..
attempt=..] MESSAGE``; ``json`` writes one object per line with ``ts``, ``level``,
``logger``, ``msg``, ``node`` and, for a line about a message, ``tracking_id``,
``attempt``, ``stream_seq`` and ``traceparent``. The same fields as the handler host's
lines (``handler_host/logs.py``; the two images share no code). Payloads are never
logged.

``bind(seq, attempt)`` starts a message's tags in its task (a context variable);
``tag(...)`` adds what is known once the input is decoded.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_FIELDS = ("tracking_id", "attempt", "stream_seq", "traceparent")

_current: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "kre_sidecar_message", default=None
)


def bind(seq: int, attempt: int) -> None:
    """Tag every line logged from now on in this task with the message's sequence."""
    _current.set({"stream_seq": seq, "attempt": attempt})


def tag(**fields: str) -> None:
    """Add the decoded message's tracking id (and traceparent) to the current tags."""
    tags = _current.get()
    if tags is not None:
        tags.update({k: v for k, v in fields.items() if v})


class _MessageFilter(logging.Filter):
    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def filter(self, record: logging.LogRecord) -> bool:
        record.kre_node = self.node
        record.kre_tags = dict(_current.get() or {})
        return True


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        tags = getattr(record, "kre_tags", {})
        if not tags:
            return super().format(record)
        prefix = " ".join(f"{k}={tags[k]}" for k in _FIELDS if k in tags and k != "traceparent")
        original = record.msg
        record.msg = f"[node={getattr(record, 'kre_node', '')} {prefix}] {record.msg}"
        try:
            return super().format(record)
        finally:
            record.msg = original


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "node": getattr(record, "kre_node", ""),
            **getattr(record, "kre_tags", {}),
        }
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: str, fmt: str, node: str) -> None:
    """One handler on the root logger, in the chosen format, tagging message lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter(TEXT_FORMAT))
    handler.addFilter(_MessageFilter(node))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
