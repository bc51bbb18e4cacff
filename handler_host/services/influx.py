"""``ctx.measurement``: points for InfluxDB through ``influxdb-client``.

``save`` checks its arguments, builds the line (``line_protocol``), adds the
``version`` tag as KRE does, and queues it on a ``BatchWriter``: it is not awaited
and never blocks the handler. A down InfluxDB costs lost points (counted, logged at
most once per interval), never a slow or failed message.

The bucket is ``KRT_INFLUX_BUCKET`` (default ``kre``); with InfluxDB 1.8 a bucket means
``database/retention-policy`` and the token, if any, ``username:password``.
"""

from __future__ import annotations

import logging
import math
import numbers
import time as _time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Protocol

from handler_host.services.errors import ServiceArgumentError
from handler_host.services.influx_writer import BatchWriter, WriterStats
from handler_host.settings import mask_uri

logger = logging.getLogger(__name__)

FieldValue = bool | int | float | str
TagValue = str | int | float | bool

# influxdb_client's WritePrecision values. influxdb_client itself is imported on first
# use: it is 14 MB of memory that a host without KRT_INFLUX_URI never needs.
PRECISION_S = "s"
PRECISION_MS = "ms"
PRECISION_US = "us"
PRECISION_NS = "ns"
# Nanoseconds per unit of each precision.
_NS_PER = {PRECISION_S: 10**9, PRECISION_MS: 10**6, PRECISION_US: 10**3, PRECISION_NS: 1}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_INT64 = (-(2**63), 2**63 - 1)
# Keys InfluxDB refuses: one such point makes the server reject the whole batch.
_RESERVED_KEYS = ("time", "_measurement", "_field")
_SAVE = "ctx.measurement.save"


class PointSink(Protocol):
    """Where ``Measurements`` puts its lines: a ``BatchWriter``, or a fake in tests."""

    def submit(self, precision: str, line: str) -> None: ...

    def flush(self, timeout_s: float) -> bool: ...

    def close(self, timeout_s: float) -> None: ...

    @property
    def stats(self) -> WriterStats: ...


class Measurements:
    """``ctx.measurement``: ``save(measurement, fields, tags, time=None, precision=NS)``."""

    PRECISION_S = PRECISION_S
    PRECISION_MS = PRECISION_MS
    PRECISION_US = PRECISION_US
    PRECISION_NS = PRECISION_NS

    def __init__(self, sink: PointSink, version: str, workflow: str = "", node: str = "") -> None:
        self._sink = sink
        self._version = version
        self._workflow = workflow
        self._node = node

    def save(
        self,
        measurement: str,
        fields: Mapping[str, FieldValue],
        tags: Mapping[str, TagValue] | None,
        time: datetime | int | None = None,
        precision: str = PRECISION_NS,
    ) -> None:
        """Queue one point with the tag ``version`` added (it replaces a user's own).

        ``time`` defaults to now; a naive datetime is taken as UTC; an int is taken as
        already counted in ``precision`` units since the epoch.
        """
        if tags is not None and not isinstance(tags, Mapping):
            raise ServiceArgumentError(_SAVE, "tags", tags, "must be a dict")
        all_tags = {**(tags or {}), "version": self._version} if self._version else tags
        line = line_protocol(measurement, fields, all_tags, time, precision)
        self._sink.submit(precision, line)

    def record_node_elapsed(
        self,
        *,
        tracking_id: str,
        node_from: str,
        start: datetime,
        end: datetime,
        previous_end: datetime | None = None,
        workflow_start: datetime | None = None,
    ) -> None:
        """KRE's per-message timing, for the host to call once per handled message.

        Writes ``node_elapsed_time`` (tags workflow, version, node; fields tracking_id,
        node_from, elapsed_ms = end - start, waiting_ms = start - previous_end, the end
        of the previous node's tracking entry). On the workflow's last node, pass
        ``workflow_start`` (the start of the first tracking entry): it also writes
        ``workflow_elapsed_time`` (tags workflow, version; fields elapsed_ms = end -
        workflow_start, tracking_id). Naive datetimes are taken as UTC, as KRE's
        tracking strings are.
        """
        tags = {"workflow": self._workflow, "version": self._version, "node": self._node}
        waiting = _ms(start, previous_end) if previous_end is not None else 0.0
        fields: dict[str, FieldValue] = {
            "tracking_id": tracking_id,
            "node_from": node_from,
            "elapsed_ms": _ms(end, start),
            "waiting_ms": waiting,
        }
        self._submit_internal("node_elapsed_time", fields, tags)
        if workflow_start is not None:
            tags = {"workflow": self._workflow, "version": self._version}
            fields = {"elapsed_ms": _ms(end, workflow_start), "tracking_id": tracking_id}
            self._submit_internal("workflow_elapsed_time", fields, tags)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Write what is queued now; False when that took longer than ``timeout_s``."""
        return self._sink.flush(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush (bounded by ``timeout_s``) and stop the background writer."""
        self._sink.close(timeout_s)

    @property
    def stats(self) -> WriterStats:
        return self._sink.stats

    def _submit_internal(
        self, measurement: str, fields: dict[str, FieldValue], tags: dict[str, str]
    ) -> None:
        # Unset names (an empty KRT_WORKFLOW_NAME) become absent tags, as in InfluxDB.
        present = {key: value for key, value in tags.items() if value}
        self._sink.submit(PRECISION_NS, line_protocol(measurement, fields, present))


def line_protocol(
    measurement: str,
    fields: Mapping[str, FieldValue],
    tags: Mapping[str, TagValue] | None = None,
    time: datetime | int | None = None,
    precision: str = PRECISION_NS,
) -> str:
    """Check the arguments of ``ctx.measurement.save`` and return the exact line sent.

    Strings are quoted and escaped, ints get ``i``, bools are ``true``/``false``,
    measurement, keys and tag values are escaped, tags are sorted by key, and the
    timestamp is an integer count of ``precision`` units (exact, no float rounding).
    """
    if not isinstance(measurement, str) or not measurement:
        raise ServiceArgumentError(_SAVE, "measurement", measurement, "must be a nonempty string")
    from influxdb_client.client.write.point import Point

    point = Point(measurement)
    for key, value in _checked_fields(fields).items():
        point.field(key, value)
    for key, text in _checked_tags(tags).items():
        point.tag(key, text)
    point.time(timestamp(time, precision), precision)
    return str(point.to_line_protocol())


def timestamp(time: datetime | int | None, precision: str) -> int:
    """``time`` as an integer count of ``precision`` units since the epoch (now if None)."""
    if precision not in _NS_PER:
        allowed = ", ".join(repr(p) for p in _NS_PER)
        raise ServiceArgumentError(_SAVE, "precision", precision, f"must be one of {allowed}")
    if time is None:
        return _time.time_ns() // _NS_PER[precision]
    if isinstance(time, datetime):
        aware = time if time.tzinfo is not None else time.replace(tzinfo=UTC)
        ns = (aware - _EPOCH) // timedelta(microseconds=1) * 1000
        return ns // _NS_PER[precision]
    if isinstance(time, int) and not isinstance(time, bool):
        return time
    raise ServiceArgumentError(_SAVE, "time", time, "must be a datetime, an int or None")


def _checked_fields(fields: object) -> dict[str, FieldValue]:
    if not isinstance(fields, Mapping) or not fields:
        raise ServiceArgumentError(_SAVE, "fields", fields, "must be a nonempty dict")
    checked: dict[str, FieldValue] = {}
    for key, value in fields.items():
        _check_key("fields", key)
        checked[key] = _field_value(key, value)
    return checked


def _field_value(key: str, value: object) -> FieldValue:
    """A builtin bool, int, float or str; numpy scalars are converted."""
    if _is_numpy_bool(value):
        return bool(value)
    if isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        number = int(value)
        if not _INT64[0] <= number <= _INT64[1]:
            raise ServiceArgumentError(_SAVE, f"fields[{key!r}]", value, "must fit in 64 bits")
        return number
    if isinstance(value, numbers.Real):
        real = float(value)
        if not math.isfinite(real):
            raise ServiceArgumentError(_SAVE, f"fields[{key!r}]", value, "must be finite")
        return real
    raise ServiceArgumentError(
        _SAVE, f"fields[{key!r}]", value, "must be a bool, an int, a float or a string"
    )


def _checked_tags(tags: object) -> dict[str, str]:
    if tags is None:
        return {}
    if not isinstance(tags, Mapping):
        raise ServiceArgumentError(_SAVE, "tags", tags, "must be a dict")
    checked: dict[str, str] = {}
    for key, value in tags.items():
        _check_key("tags", key)
        if not isinstance(value, str | int | float) or value == "":
            requirement = "must be a nonempty string (or a number)"
            raise ServiceArgumentError(_SAVE, f"tags[{key!r}]", value, requirement)
        checked[key] = str(value)
    return checked


def _check_key(argument: str, key: object) -> None:
    if not isinstance(key, str) or not key:
        raise ServiceArgumentError(_SAVE, argument, key, "must have nonempty string keys")
    if key in _RESERVED_KEYS:
        reserved = ", ".join(repr(k) for k in _RESERVED_KEYS)
        raise ServiceArgumentError(_SAVE, argument, key, f"must not use the keys {reserved}")


def _is_numpy_bool(value: object) -> bool:
    return type(value).__name__ == "bool_" and type(value).__module__ == "numpy"


def _ms(later: datetime, earlier: datetime) -> float:
    return (_as_utc(later) - _as_utc(earlier)) / timedelta(milliseconds=1)


def _as_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class InfluxSender:
    """``send(precision, lines)`` for the ``BatchWriter``: one synchronous write each.

    Only the writer thread calls it. The client has no retries: a failed batch is
    counted and dropped, so an outage never builds a backlog of retries.
    """

    def __init__(self, url: str, bucket: str, org: str, token: str, timeout_s: float) -> None:
        from influxdb_client.client.influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS

        self._bucket = bucket
        self._org = org
        self._client = InfluxDBClient(
            url=url, token=token, org=org, timeout=max(1, int(timeout_s * 1000))
        )
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)

    def __call__(self, precision: str, lines: list[str]) -> None:
        self._write_api.write(
            bucket=self._bucket,
            org=self._org,
            record=lines,
            write_precision=precision,  # type: ignore[arg-type]  # the enum's values are str
        )

    def close(self) -> None:
        self._client.close()


def new_measurements(
    url: str,
    *,
    bucket: str,
    org: str,
    token: str,
    version: str,
    workflow: str = "",
    node: str = "",
    timeout_s: float = 5.0,
    queue_size: int = 10_000,
    batch_size: int = 1_000,
    flush_interval_s: float = 1.0,
    report_interval_s: float = 30.0,
) -> Measurements:
    """``ctx.measurement`` writing to ``url``; connects nothing until the first batch."""
    sender = InfluxSender(url, bucket, org, token, timeout_s)
    where = f"InfluxDB at {mask_uri(url)} (bucket {bucket!r})"
    writer = BatchWriter(
        sender,
        where=where,
        queue_size=queue_size,
        batch_size=batch_size,
        flush_interval_s=flush_interval_s,
        report_interval_s=report_interval_s,
        on_close=sender.close,
    )
    logger.info("%s: measurements batched in the background", where)
    return Measurements(writer, version=version, workflow=workflow, node=node)
