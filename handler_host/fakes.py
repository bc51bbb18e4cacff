"""In-memory ``ctx.db``, ``ctx.prediction`` and ``ctx.measurement`` for handler tests.

They run the real services' argument checks, and ``InMemoryDB.find`` understands the
common MongoDB query operators, so a handler tested against them behaves as it will
against the real stores. ``handler_host.testing`` re-exports ``InMemoryStores``.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import bson
from bson.errors import InvalidDocument

from handler_host.services.errors import ServiceArgumentError, StoreError
from handler_host.services.influx import PRECISION_NS, Measurements
from handler_host.services.influx_writer import WriterStats
from handler_host.services.mongo import PREDICTION_COLLECTION, check_collection
from handler_host.services.mongo import prediction_document as _prediction_document


def _bson_copy(method: str, argument: str, value: Any) -> Any:
    """``value`` as MongoDB would give it back: BSON-checked, datetimes naive UTC (ms)."""
    try:
        return bson.decode(bson.encode({"v": value}))["v"]
    except (InvalidDocument, TypeError, OverflowError) as err:
        requirement = f"must be encodable as BSON: {err}"
        raise ServiceArgumentError(method, argument, value, requirement) from err


class InMemoryDB:
    """``ctx.db`` in memory: ``save``/``find`` with the real one's argument checks.

    ``find`` understands equality (also of one element of an array, and dotted keys),
    ``$eq $ne $gt $gte $lt $lte $in $nin $exists``, ``$and`` and ``$or``. Documents
    round-trip through BSON as with MongoDB (an ``_id`` is added; datetimes come back
    naive in UTC with millisecond precision).
    """

    def __init__(self) -> None:
        self.collections: dict[str, list[dict[str, Any]]] = {}

    async def save(self, coll: str, data: dict[str, Any]) -> None:
        self.insert("ctx.db.save", coll, data)

    async def find(self, coll: str, query: dict[str, Any]) -> list[dict[str, Any]]:
        method = "ctx.db.find"
        check_collection(method, coll)
        if not isinstance(query, dict) or not query:
            raise ServiceArgumentError(method, "query", query, "must be a nonempty dict")
        _check_query(method, query)
        wanted = _bson_copy(method, "query", query)
        docs = self.collections.get(coll, [])
        return [copy.deepcopy(doc) for doc in docs if _matches(doc, wanted)]

    def insert(self, method: str, coll: str, data: dict[str, Any]) -> None:
        check_collection(method, coll)
        if not isinstance(data, dict):
            raise ServiceArgumentError(method, "data", data, "must be a dict")
        doc = _bson_copy(method, "data", data)
        doc.setdefault("_id", bson.ObjectId())
        docs = self.collections.setdefault(coll, [])
        if any(other["_id"] == doc["_id"] for other in docs):
            raise StoreError(method, "in-memory ctx.db", f"E11000 duplicate key _id {doc['_id']}")
        docs.append(doc)


_OPERATORS = {"$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists"}


def _check_query(method: str, query: dict[str, Any]) -> None:
    """Refuse, before looking at any document, what this fake cannot answer truly."""
    for key, condition in query.items():
        if key in ("$and", "$or"):
            if not isinstance(condition, list) or not condition:
                raise ServiceArgumentError(method, "query", key, "needs a nonempty list")
            for part in condition:
                _check_query(method, part)
        elif key.startswith("$"):
            raise _unsupported(method, key)
        elif _is_operators(condition):
            unknown = sorted(condition.keys() - _OPERATORS)
            if unknown:
                raise _unsupported(method, unknown[0])


def _is_operators(cond: Any) -> bool:
    return isinstance(cond, dict) and bool(cond) and all(str(k).startswith("$") for k in cond)


def _matches(doc: dict[str, Any], query: dict[str, Any]) -> bool:
    for key, condition in query.items():
        if key in ("$and", "$or"):
            results = (_matches(doc, part) for part in condition)
            ok = all(results) if key == "$and" else any(results)
        else:
            found, value = _lookup(doc, key)
            ok = _holds(found, value, condition)
        if not ok:
            return False
    return True


def _lookup(doc: Any, key: str) -> tuple[bool, Any]:
    for part in key.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return False, None
        doc = doc[part]
    return True, doc


def _holds(found: bool, value: Any, condition: Any) -> bool:
    if not _is_operators(condition):
        return found and _equal(value, condition)
    return all(_operator(op, found, value, arg) for op, arg in condition.items())


def _equal(value: Any, wanted: Any) -> bool:
    return value == wanted or (isinstance(value, list) and wanted in value)


def _operator(op: str, found: bool, value: Any, arg: Any) -> bool:
    if op == "$exists":
        return found == bool(arg)
    if op in ("$eq", "$ne"):
        return (found and _equal(value, arg)) == (op == "$eq")
    if op in ("$in", "$nin"):
        inside = found and any(_equal(value, item) for item in arg)
        return inside == (op == "$in")
    compare = _COMPARE[op]
    candidates = value if isinstance(value, list) else [value]
    return found and any(_compare(compare, item, arg) for item in candidates)


_COMPARE = {"$gt": operator.gt, "$gte": operator.ge, "$lt": operator.lt, "$lte": operator.le}


def _compare(compare: Any, item: Any, arg: Any) -> bool:
    try:
        return bool(compare(item, arg))
    except TypeError:  # MongoDB compares within one type bracket only
        return False


def _unsupported(method: str, op: str) -> ServiceArgumentError:
    return ServiceArgumentError(
        method, "query", op, "is not supported by the in-memory ctx.db: test with a real MongoDB"
    )


class InMemoryPrediction:
    """``ctx.prediction`` in memory: KRE's document, checked as the real one checks it."""

    def __init__(self, db: InMemoryDB, version_id: str = "", version_name: str = "") -> None:
        self._db = db
        self._version_id = version_id
        self._version_name = version_name

    async def save(
        self,
        predicted_value: str = "",
        true_value: str = "",
        extra: dict[str, Any] | None = None,
        utcdate: datetime | None = None,
        error: str = "",
    ) -> None:
        versions = {"version_id": self._version_id, "version_name": self._version_name}
        doc = _prediction_document(predicted_value, true_value, extra, utcdate, error, **versions)
        self._db.insert("ctx.prediction.save", PREDICTION_COLLECTION, doc)

    @property
    def docs(self) -> list[dict[str, Any]]:
        """What was saved, in order (collection ``classificationMetrics`` of ``db``)."""
        return self._db.collections.get(PREDICTION_COLLECTION, [])


@dataclass(frozen=True)
class RecordedPoint:
    """One ``ctx.measurement.save``: its arguments and the exact line it made."""

    measurement: str
    fields: dict[str, Any]
    tags: dict[str, Any]
    timestamp: int  # in ``precision`` units since the epoch
    precision: str
    line: str


class LineSink:
    """A PointSink that keeps (precision, line) pairs and sends nothing: the sink of
    InMemoryMeasurements, and of tests of the line protocol."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def submit(self, precision: str, line: str) -> None:
        self.lines.append((precision, line))

    def flush(self, timeout_s: float) -> bool:
        return True

    def close(self, timeout_s: float) -> None:
        pass

    @property
    def stats(self) -> WriterStats:
        n = len(self.lines)
        return WriterStats(accepted=n, written=n, dropped=0, failed=0, failed_writes=0, queued=0)


class InMemoryMeasurements(Measurements):
    """``ctx.measurement``: the real checks and line, recorded in ``points``."""

    def __init__(self, version: str = "") -> None:
        self._lines = LineSink()
        super().__init__(self._lines, version)
        self.points: list[RecordedPoint] = []

    def save(
        self,
        measurement: str,
        fields: Mapping[str, Any],
        tags: Mapping[str, Any] | None,
        time: datetime | int | None = None,
        precision: str = PRECISION_NS,
    ) -> None:
        super().save(measurement, fields, tags, time, precision)
        line = self._lines.lines[-1][1]
        all_tags = {**(tags or {}), **({"version": self._version} if self._version else {})}
        stamp = int(line.rsplit(" ", 1)[1])
        self.points.append(
            RecordedPoint(measurement, dict(fields), all_tags, stamp, precision, line)
        )


class InMemoryStores:
    """``ctx.db``, ``ctx.prediction`` and ``ctx.measurement`` in memory, for tests."""

    def __init__(self, *, version_id: str = "", version_name: str = "") -> None:
        self.db = InMemoryDB()
        self.prediction = InMemoryPrediction(self.db, version_id, version_name)
        self.measurement = InMemoryMeasurements(version_name)

    def close(self) -> None:
        """Nothing to close: the data stays readable after the node stopped."""
