"""The sidecar's Prometheus metrics, registered once per process."""

from __future__ import annotations

import functools

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
PUBLISH_SECONDS = Histogram(
    "kre_sidecar_publish_seconds",
    "Time from a JetStream publish to its PubAck.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
)
REDELIVERIES = Counter(
    "kre_sidecar_redeliveries", "Input messages fetched again (delivery attempt > 1)."
)
BYTES = Counter(
    "kre_sidecar_bytes",
    "Message bytes as they travel on NATS: in (fetched inputs), out (published).",
    ["direction"],
)
COMPRESSIONS = Counter(
    "kre_sidecar_compressions",
    "Gzipped envelopes: decompressed (inputs) and compressed (outputs over the limit).",
    ["direction"],
)

# Children bound once: the per-message path does no label lookups for these.
BYTES_IN = BYTES.labels(direction="in")
BYTES_OUT = BYTES.labels(direction="out")
DECOMPRESSED = COMPRESSIONS.labels(direction="decompressed")
COMPRESSED = COMPRESSIONS.labels(direction="compressed")


@functools.cache
def published(kind: str) -> Counter:
    """The PUBLISHED child for `kind`, looked up once per kind."""
    return PUBLISHED.labels(kind=kind)


@functools.cache
def settled(outcome: str) -> Counter:
    """The MESSAGES child for `outcome`, looked up once per outcome."""
    return MESSAGES.labels(outcome=outcome)
