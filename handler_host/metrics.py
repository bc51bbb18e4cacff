"""The handler host's Prometheus metrics, and the dispatch observer that records them.

The metrics live in their own registry (``REGISTRY``, with the process and GC
collectors), served over HTTP by ``MetricsServer`` on ``KRT_METRICS_HOST:
KRT_METRICS_PORT`` (default ``0.0.0.0:9090``; port 0 turns it off). That is a plain
HTTP port apart from the gRPC socket: it serves ``/metrics`` and nothing else, no user
code, so binding every interface lets Prometheus scrape the pod IP.

``DeliveryMetrics`` is the ``DispatchObserver`` that keeps them: the in-flight gauge,
the duration by outcome, errors by exception type, early replies counted, and how long
``init`` took.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from handler_host.dispatch import DispatchObserver
from handler_host.metrics_http import ScrapeServer
from protos import runner_pb2

logger = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# The outcomes of a delivery, as the ``outcome`` label spells them.
PAYLOAD, NONE, FAILURE, RETRYABLE = "payload", "none", "failure", "retryable"

HANDLER_SECONDS = Histogram(
    "kre_handler_host_handler_seconds",
    "Time spent in handler(ctx, data) per delivery, by outcome (payload, none, failure, "
    "retryable).",
    ["outcome"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
ERRORS = Counter(
    "kre_handler_host_errors",
    "Deliveries whose handler raised, by exception class name.",
    ["type"],
    registry=REGISTRY,
)
EARLY_REPLIES = Counter(
    "kre_handler_host_early_replies",
    "Early replies sent by handlers (await ctx.early_reply(msg)).",
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "kre_handler_host_in_flight",
    "Deliveries being handled right now (sync ones waiting for a thread included).",
    registry=REGISTRY,
)
INIT_SECONDS = Gauge(
    "kre_handler_host_init_seconds",
    "How long init(ctx) took (set once it has returned).",
    registry=REGISTRY,
)
INFO = Info(
    "kre_handler_host",
    "The node this handler host runs: node, workflow, version, version_id.",
    registry=REGISTRY,
)


# Label children looked up once per value, as the sidecar's metrics do: `labels()` takes
# a lock and builds a key on every call. On first use, so no series shows before it has
# a sample.
@functools.cache
def _seconds_of(outcome: str) -> Any:
    return HANDLER_SECONDS.labels(outcome)


@functools.cache
def _errors_of(failure_type: str) -> Any:
    return ERRORS.labels(failure_type)


def outcome_of(result: runner_pb2.Result) -> str:
    """``payload``, ``none``, ``failure`` or ``retryable``."""
    kind = result.WhichOneof("outcome")
    if kind == "payload":
        return PAYLOAD
    if kind == "failure":
        return RETRYABLE if result.failure.retryable else FAILURE
    return NONE


class DeliveryMetrics(DispatchObserver):
    """Records each delivery, each early reply and ``init`` in the metrics above."""

    def init_finished(self, seconds: float) -> None:
        INIT_SECONDS.set(seconds)

    def started(self, delivery: runner_pb2.Delivery) -> None:
        IN_FLIGHT.inc()

    def early_reply_sent(self) -> None:
        EARLY_REPLIES.inc()

    def finished(self, delivery: runner_pb2.Delivery, result: runner_pb2.Result | None) -> None:
        IN_FLIGHT.dec()
        if result is not None:  # None: cancelled, neither handled nor failed
            _observe(result)


def _observe(result: runner_pb2.Result) -> None:
    outcome = outcome_of(result)
    # The Dispatcher stamped both ends; Timestamp.ToNanoseconds would check each's range.
    start, end = result.start, result.end
    span = (end.seconds - start.seconds) * 1_000_000_000 + end.nanos - start.nanos
    seconds = max(0.0, span / 1e9)
    _seconds_of(outcome).observe(seconds)
    if outcome in (FAILURE, RETRYABLE):
        _errors_of(result.failure.type).inc()
    logger.debug("handled in %.1f ms: %s", seconds * 1000, outcome)


def set_info(node: str, workflow: str, version: str, version_id: str) -> None:
    INFO.info({"node": node, "workflow": workflow, "version": version, "version_id": version_id})


class MetricsServer:
    """``/metrics`` over HTTP from a daemon thread, its threads and connections bounded
    (``handler_host.metrics_http``)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self._server = ScrapeServer(REGISTRY, host, port)
        self._server.start()
        self.port: int = self._server.port  # the bound port when given 0

    @classmethod
    def start(cls, host: str, port: int) -> MetricsServer | None:
        """Serve the metrics; None (after an error line) when the port cannot be bound.

        Metrics are for watching the node, not for running it: a port in use does not
        stop the handler host.
        """
        try:
            server = cls(host, port)
        except OSError as exc:
            logger.error(
                "metrics are off: cannot listen on %s:%d (KRT_METRICS_HOST, KRT_METRICS_PORT): %s",
                host,
                port,
                exc,
            )
            return None
        logger.info("metrics on http://%s:%d/metrics", host, server.port)
        return server

    async def close(self) -> None:
        """Stop serving (``close`` waits for the server's thread: off the event loop)."""
        await asyncio.to_thread(self._server.close)
