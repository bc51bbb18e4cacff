"""Per-message timing, written to InfluxDB as KRE's runner wrote it.

``node_elapsed_time`` (tags workflow, version, node; fields tracking_id, node_from,
elapsed_ms, waiting_ms) for every message, and ``workflow_elapsed_time`` on the last
node. ``waiting_ms`` is the time between the previous node's end (the input's last
tracking entry) and this handler's start. Nothing is written without KRT_INFLUX_URI,
and then nothing is worked out either. ``TimingRecorder`` is the ``DispatchObserver``
that records it for every delivery.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from handler_host.context import Context
from handler_host.dispatch import DispatchObserver
from protos import runner_pb2

logger = logging.getLogger(__name__)


def parse_stamp(value: str) -> datetime | None:
    """A tracking time in any form KRE's runners write, as an aware UTC datetime.

    Naive means UTC (kre-py's `utcnow().isoformat()`, with no fraction when the
    microseconds are 0; kre-go's 2006-01-02T15:04:05.000000); a fraction of any length,
    a `Z` or an offset, `T` or a space. None when empty or not a time: a bad stamp
    costs a measurement, never a message.
    """
    if not value:
        return None
    try:
        stamp = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp.astimezone(UTC)


def record_timing(
    services: Any, delivery: runner_pb2.Delivery, result: runner_pb2.Result, last_node: bool
) -> None:
    """Record the message's timing; never raises into the message's handling."""
    record = getattr(services, "record_node_elapsed", None)
    # No ``measurement`` means no InfluxDB (ContextServices): record_node_elapsed would
    # write nothing, so skip building its datetimes (a few microseconds a message).
    if record is None or getattr(services, "measurement", None) is None:
        return
    if not (result.HasField("start") and result.HasField("end")):
        return
    tracking = delivery.message.tracking
    previous = tracking[-1] if tracking else None
    try:
        record(
            tracking_id=delivery.message.tracking_id,
            node_from=previous.node_name if previous else "",
            start=result.start.ToDatetime(tzinfo=UTC),
            end=result.end.ToDatetime(tzinfo=UTC),
            previous_end=parse_stamp(previous.end) if previous else None,
            workflow_start=parse_stamp(tracking[0].start) if last_node and tracking else None,
        )
    except Exception:  # a measurement must never fail a message
        logger.exception("could not record the message's timing")


class TimingRecorder(DispatchObserver):
    """Records each delivery's timing through the Context's data services."""

    def __init__(self, context: Context) -> None:
        self._context = context

    def finished(self, delivery: runner_pb2.Delivery, result: runner_pb2.Result | None) -> None:
        if result is not None:
            context = self._context
            record_timing(context.services, delivery, result, context.is_last_node)
