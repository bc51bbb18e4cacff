"""``ctx.db`` and ``ctx.prediction``: MongoDB through PyMongo's async API.

One ``AsyncMongoClient`` per process, made at start by ``new_mongo_client`` and shared
by both stores. PyMongo connects lazily, so a MongoDB that is down at start does not
stop the handler host from starting; a call made while it is down raises
``StoreUnavailableError`` within the timeout instead of hanging.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from bson.errors import InvalidDocument
from pymongo import AsyncMongoClient
from pymongo.errors import ConfigurationError, ConnectionFailure, InvalidURI, PyMongoError

from handler_host.errors import SettingsError
from handler_host.services.errors import (
    ServiceArgumentError,
    StoreError,
    StoreUnavailableError,
)
from handler_host.settings import mask_uri

logger = logging.getLogger(__name__)

Document = dict[str, Any]
MongoClient = AsyncMongoClient[Document]
_T = TypeVar("_T")

PREDICTION_COLLECTION = "classificationMetrics"
ERR_MISSING_VALUES = "missing_values"
ERR_NEW_LABELS = "new_labels"
PREDICTION_ERRORS = (ERR_MISSING_VALUES, ERR_NEW_LABELS)

# Extra time given to PyMongo to report its own timeout before asyncio's guard fires.
_GUARD_S = 1.0
_DETAIL_CHARS = 300


def new_mongo_client(uri: str, timeout_s: float) -> MongoClient:
    """The process's one client. Connects nothing yet; every operation is bounded.

    Raises SettingsError (password masked) when PyMongo refuses the URI.

    ``timeout_s`` (KRT_MONGO_TIMEOUT) becomes serverSelectionTimeoutMS, connectTimeoutMS
    and timeoutMS (the client-side bound on a whole operation, reading a find's
    results included), overriding the same options in the URI.
    """
    timeout_ms = max(1, int(timeout_s * 1000))
    try:
        client: MongoClient = AsyncMongoClient(
            uri,
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=timeout_ms,
            timeoutMS=timeout_ms,
            appname="kre-handler-host",
        )
    except (ConfigurationError, InvalidURI, ValueError, TypeError) as err:
        problem = f"KRT_MONGO_URI={mask_uri(uri)!r} is not a usable MongoDB URI: "
        raise SettingsError([], [problem + _scrub(str(err), uri)]) from None
    logger.info("MongoDB client created for %s (timeout %g s)", mask_uri(uri), timeout_s)
    return client


class _Calls:
    """Runs one operation: bounded in time, PyMongo errors turned into service errors."""

    def __init__(self, where: str, timeout_s: float) -> None:
        self.where = where
        self.timeout_s = timeout_s

    async def run(
        self, method: str, argument: str, value: object, op: Callable[[], Awaitable[_T]]
    ) -> _T:
        try:
            # PyMongo enforces timeoutMS itself; this guard only makes "never hangs" hold
            # even if a server accepts the connection and then says nothing.
            async with asyncio.timeout(self.timeout_s + _GUARD_S):
                return await op()
        except TimeoutError as err:
            raise StoreUnavailableError(method, self.where, self.timeout_s, "no answer") from err
        except InvalidDocument as err:
            # Raised while encoding user data, before anything is sent.
            requirement = f"must be encodable as BSON: {_cut(str(err))}"
            raise ServiceArgumentError(method, argument, value, requirement) from err
        except PyMongoError as err:
            if isinstance(err, ConnectionFailure) or err.timeout:
                raise StoreUnavailableError(
                    method, self.where, self.timeout_s, _detail(err)
                ) from err
            raise StoreError(method, self.where, _detail(err)) from err
        except Exception as err:  # the driver failing on an answer it did not expect
            raise StoreError(method, self.where, f"{type(err).__name__}: {_cut(str(err))}") from err


class MongoStore:
    """``ctx.db``: documents in the database KRT_MONGO_DB (default ``data``).

    ``KRT_NATS_MONGO_WRITER`` stays accepted for KRE compatibility (in KRE it named a
    NATS subject of a separate Mongo writer; here the handler host writes directly).
    """

    def __init__(self, client: MongoClient, database: str, timeout_s: float) -> None:
        self._db = client[database]
        where = f"MongoDB at {_hosts(client)} (database {database!r})"
        self._calls = _Calls(where, timeout_s)

    async def save(self, coll: str, data: Document) -> None:
        """Insert ``data`` (a dict) into collection ``coll``. ``data`` is not modified."""
        method = "ctx.db.save"
        check_collection(method, coll)
        if not isinstance(data, dict):
            raise ServiceArgumentError(method, "data", data, "must be a dict")
        doc = dict(data)  # insert_one adds "_id" to what it is given: not to the caller's dict
        await self._calls.run(method, "data", data, lambda: self._db[coll].insert_one(doc))

    async def find(self, coll: str, query: Document) -> list[Document]:
        """The documents of ``coll`` matching ``query`` (a nonempty dict, as in KRE)."""
        method = "ctx.db.find"
        check_collection(method, coll)
        if not isinstance(query, dict) or not query:
            raise ServiceArgumentError(method, "query", query, "must be a nonempty dict")
        return await self._calls.run(
            method, "query", query, lambda: self._db[coll].find(query).to_list()
        )


class PredictionStore:
    """``ctx.prediction``: classification metrics, shaped as KRE writes them."""

    ERR_MISSING_VALUES = ERR_MISSING_VALUES
    ERR_NEW_LABELS = ERR_NEW_LABELS

    def __init__(
        self,
        client: MongoClient,
        database: str,
        timeout_s: float,
        version_id: str,
        version_name: str,
    ) -> None:
        self._coll = client[database][PREDICTION_COLLECTION]
        self._version_id = version_id
        self._version_name = version_name
        where = f"MongoDB at {_hosts(client)} (database {database!r})"
        self._calls = _Calls(where, timeout_s)

    async def save(
        self,
        predicted_value: str = "",
        true_value: str = "",
        extra: dict[str, Any] | None = None,
        utcdate: datetime | None = None,
        error: str = "",
    ) -> None:
        """Insert one document into ``classificationMetrics`` (see ``prediction_document``)."""
        doc = prediction_document(
            predicted_value,
            true_value,
            extra,
            utcdate,
            error,
            version_id=self._version_id,
            version_name=self._version_name,
        )
        await self._calls.run(
            "ctx.prediction.save", "extra", extra, lambda: self._coll.insert_one(doc)
        )


def prediction_document(
    predicted_value: str,
    true_value: str,
    extra: dict[str, Any] | None,
    utcdate: datetime | None,
    error: str,
    *,
    version_id: str,
    version_name: str,
) -> Document:
    """Check the arguments of ``ctx.prediction.save`` and build KRE's document.

    ``error`` is "" or one of ``missing_values``, ``new_labels``; without an error both
    values must be nonempty strings. ``utcdate`` defaults to now; a naive datetime is
    taken as UTC, an aware one must have a zero UTC offset.
    """
    method = "ctx.prediction.save"
    if not isinstance(error, str) or (error and error not in PREDICTION_ERRORS):
        allowed = ", ".join(repr(e) for e in PREDICTION_ERRORS)
        raise ServiceArgumentError(method, "error", error, f"must be '' or one of {allowed}")
    for name, value in (("predicted_value", predicted_value), ("true_value", true_value)):
        if not isinstance(value, str) or (not error and not value):
            requirement = "must be a string" if error else "must be a nonempty string"
            raise ServiceArgumentError(method, name, value, requirement)
    if extra is not None and not isinstance(extra, dict):
        raise ServiceArgumentError(method, "extra", extra, "must be a dict or None")
    return {
        "date": rfc3339_utc(method, utcdate),
        "error": error,
        "predictedValue": predicted_value,
        "trueValue": true_value,
        "extra": extra,
        "versionId": version_id,
        "versionName": version_name,
    }


def rfc3339_utc(method: str, utcdate: datetime | None) -> str:
    """``2024-05-01T12:00:00.123456Z``: KRE's format, always with microseconds."""
    if utcdate is None:
        utcdate = datetime.now(UTC)
    if not isinstance(utcdate, datetime):
        raise ServiceArgumentError(method, "utcdate", utcdate, "must be a datetime or None")
    offset = utcdate.utcoffset()
    if offset is not None and offset.total_seconds() != 0:
        raise ServiceArgumentError(method, "utcdate", utcdate, "must be a UTC datetime")
    return utcdate.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def check_collection(method: str, coll: object) -> None:
    """KRE's check (a nonempty string), plus MongoDB's own rules on collection names."""
    if not isinstance(coll, str) or not coll:
        raise ServiceArgumentError(method, "collection", coll, "must be a nonempty string")
    bad = (
        "$" in coll
        or "\x00" in coll
        or ".." in coll
        or coll.startswith((".", "system."))
        or coll.endswith(".")
    )
    if bad:
        raise ServiceArgumentError(
            method,
            "collection",
            coll,
            "must be a valid MongoDB collection name (no '$', NUL or '..', "
            "not starting with 'system.' or '.', not ending with '.')",
        )


def _hosts(client: MongoClient) -> str:
    # The seed list from the URI: host:port pairs only, never credentials.
    seeds = sorted(client.topology_description.server_descriptions(), key=str)
    return ",".join(host if port is None else f"{host}:{port}" for host, port in seeds) or "?"


def _detail(err: PyMongoError) -> str:
    # ServerSelectionTimeoutError appends a long topology description: keep the cause.
    return _cut(str(err).split(", Timeout:", 1)[0])


def _cut(text: str) -> str:
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def _scrub(text: str, uri: str) -> str:
    """Remove the URI's password from an error message, in case the driver quoted it."""
    try:
        password = urlsplit(uri).password
    except ValueError:
        password = None
    if password:
        for form in {password, unquote(password)}:
            text = text.replace(form, "***")
    return text
