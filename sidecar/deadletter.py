"""The dead-letter message: the input exactly as it came, and why it was given up on.

Published through JetStream to KRT_NATS_DLQ_SUBJECT (default `<output>.dlq`), which a
stream must capture. The data is the input message's bytes as fetched (gzip and all), so
an operator can read it, fix the cause and publish it to the input subject again. The
headers say what happened:

| header                | value                                                    |
|-----------------------|----------------------------------------------------------|
| `Kre-Dlq-Reason`      | why, as in the error envelope (one line, at most 1 KiB)  |
| `Kre-Dlq-Node`        | KRT_NODE_NAME                                            |
| `Kre-Dlq-Stream`      | the input's stream                                       |
| `Kre-Dlq-Sequence`    | the input's stream sequence                              |
| `Kre-Dlq-Subject`     | the input's subject                                      |
| `Kre-Dlq-Tracking-Id` | the tracking id (absent when the input could not be read)|
| `Kre-Dlq-Attempts`    | deliveries of the input so far                           |
| `Kre-Dlq-Time`        | when it was dead-lettered, UTC                           |
| `Kre-Dlq-Size`        | the input's size in bytes                                |
| `Kre-Dlq-Truncated`   | `true` when the data had to be cut to fit max_payload    |
| `Nats-Msg-Id`         | `<stream>:<seq>:<node>:dlq`: a retried dead letter lands once |

The input's own headers are kept, except JetStream's (`Nats-*`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from nats.aio.msg import Msg

from sidecar.envelope import rfc3339

PREFIX = "Kre-Dlq-"
MAX_REASON_CHARS = 1024
# Bytes for the NATS/1.0 line and the header block's framing, counted generously.
_FRAMING = 64


@dataclass(frozen=True)
class DeadLetter:
    data: bytes
    headers: dict[str, str]

    @property
    def msg_id(self) -> str:
        return self.headers["Nats-Msg-Id"]


def build(
    msg: Msg,
    *,
    reason: str,
    node: str,
    stream: str,
    tracking_id: str,
    max_payload: int | None = None,
) -> DeadLetter:
    """The dead letter for `msg`; its data is cut when data and headers exceed max_payload."""
    meta = msg.metadata
    headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith(("Nats-", PREFIX))}
    headers.update(
        {
            "Nats-Msg-Id": f"{stream}:{meta.sequence.stream}:{node}:dlq",
            f"{PREFIX}Reason": _one_line(reason, MAX_REASON_CHARS),
            f"{PREFIX}Node": node,
            f"{PREFIX}Stream": stream,
            f"{PREFIX}Sequence": str(meta.sequence.stream),
            f"{PREFIX}Subject": msg.subject,
            f"{PREFIX}Attempts": str(meta.num_delivered),
            f"{PREFIX}Time": rfc3339(datetime.now(UTC)),
            f"{PREFIX}Size": str(len(msg.data)),
        }
    )
    if tracking_id:
        headers[f"{PREFIX}Tracking-Id"] = _one_line(tracking_id, MAX_REASON_CHARS)
    data = msg.data
    if max_payload is not None:
        room = max_payload - header_size({**headers, f"{PREFIX}Truncated": "true"})
        if len(data) > room:
            headers[f"{PREFIX}Truncated"] = "true"
            data = data[: max(room, 0)]
    return DeadLetter(data, headers)


def header_size(headers: dict[str, str]) -> int:
    """Bytes the headers take on the wire (UTF-8), with room for the framing."""
    return _FRAMING + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


def _one_line(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
