"""The sidecar's Prometheus metrics, registered once per process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES = Counter(
    "kre_sidecar_messages",
    "Input messages settled, by outcome (published, acked, skipped_replied, "
    "error_published, retried, dead_lettered, abandoned).",
    ["outcome"],
)
IN_FLIGHT = Gauge("kre_sidecar_in_flight", "Input messages being processed right now.")
HANDLER_SECONDS = Histogram(
    "kre_sidecar_handler_seconds",
    "Time from handing a message to the handler host to getting its result.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
PUBLISHED = Counter(
    "kre_sidecar_published",
    "Envelopes published to JetStream, by kind (output, error, early_reply).",
    ["kind"],
)
