"""The context data services: ``ctx.db``, ``ctx.prediction`` and ``ctx.measurement``.

``ServiceSettings.from_env`` reads their variables once; ``Services.from_settings``
builds the clients once at start (connecting nothing: a store that is down at start
does not stop the handler host); ``Services.close`` flushes InfluxDB and closes
MongoDB at shutdown. A service whose URI is unset is ``None``.

The drivers (pymongo, influxdb_client: about 20 MB of memory together) are imported
only when their URI is set.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from handler_host.errors import SettingsError
from handler_host.services.errors import (
    ServiceArgumentError,
    ServiceError,
    StoreError,
    StoreUnavailableError,
)
from handler_host.services.influx import Measurements, line_protocol, new_measurements
from handler_host.settings import mask_uri

if TYPE_CHECKING:
    from handler_host.services.mongo import MongoClient, MongoStore, PredictionStore

logger = logging.getLogger(__name__)


def __getattr__(name: str) -> Any:
    """``MongoStore`` and ``PredictionStore``, importing pymongo when first asked for."""
    if name in ("MongoStore", "PredictionStore"):
        from handler_host.services import mongo

        return getattr(mongo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_BAD_DB_CHARS = frozenset('/\\. "$\x00')

__all__ = [
    "Measurements",
    "MongoStore",
    "PredictionStore",
    "ServiceArgumentError",
    "ServiceError",
    "ServiceSettings",
    "Services",
    "StoreError",
    "StoreUnavailableError",
    "line_protocol",
    "mask_uri",
]


@dataclass(frozen=True, repr=False)
class ServiceSettings:
    """The data services' variables, all optional; empty values count as unset.

    ``KRT_NATS_MONGO_WRITER`` stays accepted for KRE compatibility (in KRE it named a
    NATS subject of a separate Mongo writer; here the handler host writes directly).
    The ``influx_*`` tuning fields after it are not read from the environment.
    """

    mongo_uri: str | None = None  # KRT_MONGO_URI
    mongo_db: str = "data"  # KRT_MONGO_DB: ctx.db and ctx.prediction alike
    mongo_timeout_s: float = 5.0  # KRT_MONGO_TIMEOUT: bound on every MongoDB call
    influx_uri: str | None = None  # KRT_INFLUX_URI
    # KRT_INFLUX_BUCKET, else KRT_RUNTIME_ID, else kre ("database/retention-policy" on 1.8)
    influx_bucket: str = "kre"
    influx_org: str = ""  # KRT_INFLUX_ORG
    influx_token: str = ""  # KRT_INFLUX_TOKEN ("username:password" on 1.8)
    nats_mongo_writer: str | None = None  # KRT_NATS_MONGO_WRITER: accepted, unused
    influx_timeout_s: float = 5.0
    influx_queue_size: int = 10_000
    influx_batch_size: int = 1_000
    influx_flush_interval_s: float = 1.0
    influx_report_interval_s: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ServiceSettings:
        """Read the variables; one SettingsError lists every invalid value."""

        def get(name: str) -> str | None:
            return env.get(name, "").strip() or None

        invalid: list[str] = []
        timeout = 5.0
        raw_timeout = get("KRT_MONGO_TIMEOUT")
        if raw_timeout is not None:
            try:
                timeout = _positive_seconds(raw_timeout)
            except ValueError:
                invalid.append(f"KRT_MONGO_TIMEOUT={raw_timeout!r}, expected seconds, a number > 0")
        mongo_db = get("KRT_MONGO_DB") or "data"
        if _BAD_DB_CHARS.intersection(mongo_db) or len(mongo_db.encode()) > 63:
            invalid.append(
                f"KRT_MONGO_DB={mongo_db!r}, expected a MongoDB database name "
                '(at most 63 bytes, none of / \\ . space " $)'
            )
        influx_uri = get("KRT_INFLUX_URI")
        if influx_uri is not None and not _is_http_url(influx_uri):
            invalid.append(f"KRT_INFLUX_URI={mask_uri(influx_uri)!r}, expected http(s)://HOST:PORT")
        if invalid:
            raise SettingsError([], invalid)
        return cls(
            mongo_uri=get("KRT_MONGO_URI"),
            mongo_db=mongo_db,
            mongo_timeout_s=timeout,
            influx_uri=influx_uri,
            # kre-py writes to the bucket named after the runtime.
            influx_bucket=get("KRT_INFLUX_BUCKET") or get("KRT_RUNTIME_ID") or "kre",
            influx_org=get("KRT_INFLUX_ORG") or "",
            influx_token=get("KRT_INFLUX_TOKEN") or "",
            nats_mongo_writer=get("KRT_NATS_MONGO_WRITER"),
        )

    def summary(self) -> dict[str, str]:
        """Every setting as text for a log line: URIs masked, the token never shown."""
        return {
            "mongo_uri": mask_uri(self.mongo_uri) if self.mongo_uri else "(unset: no ctx.db)",
            "mongo_db": self.mongo_db,
            "mongo_timeout_s": f"{self.mongo_timeout_s:g}",
            "influx_uri": (
                mask_uri(self.influx_uri) if self.influx_uri else "(unset: no ctx.measurement)"
            ),
            "influx_bucket": self.influx_bucket,
            "influx_org": self.influx_org,
            "influx_token": "***" if self.influx_token else "(unset)",
            "nats_mongo_writer": self.nats_mongo_writer or "(unset)",
        }

    def __repr__(self) -> str:
        shown = ", ".join(f"{key}={value!r}" for key, value in self.summary().items())
        return f"ServiceSettings({shown})"


class Services:
    """The services of one process; ``db``, ``prediction``, ``measurement`` may be None."""

    def __init__(
        self,
        db: MongoStore | None = None,
        prediction: PredictionStore | None = None,
        measurement: Measurements | None = None,
        mongo_client: MongoClient | None = None,
    ) -> None:
        self.db = db
        self.prediction = prediction
        self.measurement = measurement
        self._mongo_client = mongo_client
        self._closed = False

    @classmethod
    def from_settings(
        cls,
        settings: ServiceSettings,
        version_id: str,
        version_name: str,
        workflow: str,
        node: str,
    ) -> Services:
        """Build the clients (one MongoDB client for db and prediction); connect nothing."""
        logger.info("data services: %s", settings.summary())
        services = cls()
        if settings.mongo_uri:
            from handler_host.services.mongo import MongoStore, PredictionStore, new_mongo_client

            client = new_mongo_client(settings.mongo_uri, settings.mongo_timeout_s)
            timeout = settings.mongo_timeout_s
            services._mongo_client = client
            services.db = MongoStore(client, settings.mongo_db, timeout)
            services.prediction = PredictionStore(
                client, settings.mongo_db, timeout, version_id, version_name
            )
        if settings.influx_uri:
            services.measurement = new_measurements(
                settings.influx_uri,
                bucket=settings.influx_bucket,
                org=settings.influx_org,
                token=settings.influx_token,
                version=version_name,
                workflow=workflow,
                node=node,
                timeout_s=settings.influx_timeout_s,
                queue_size=settings.influx_queue_size,
                batch_size=settings.influx_batch_size,
                flush_interval_s=settings.influx_flush_interval_s,
                report_interval_s=settings.influx_report_interval_s,
            )
        return services

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
        """``Measurements.record_node_elapsed``; does nothing without KRT_INFLUX_URI."""
        if self.measurement is not None:
            self.measurement.record_node_elapsed(
                tracking_id=tracking_id,
                node_from=node_from,
                start=start,
                end=end,
                previous_end=previous_end,
                workflow_start=workflow_start,
            )

    async def close(self, influx_timeout_s: float = 10.0) -> None:
        """Flush InfluxDB (at most ``influx_timeout_s``), then close MongoDB. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.measurement is not None:
            # Joining the writer thread blocks: keep it off the event loop.
            await asyncio.to_thread(self.measurement.close, influx_timeout_s)
        if self._mongo_client is not None:
            await self._mongo_client.close()
            logger.info("MongoDB client closed")


def _positive_seconds(raw: str) -> float:
    value = float(raw)
    if not 0 < value < math.inf:  # also refuses NaN
        raise ValueError(raw)
    return value


def _is_http_url(uri: str) -> bool:
    try:
        parts = urlsplit(uri)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)
