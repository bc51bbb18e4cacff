"""The sidecar's Prometheus metrics: plain numbers on the message path, read at scrape time.

The message path counts in plain numbers on the event loop's thread (`Count`, `Timing`):
an update is one addition, with no lock, where prometheus_client's own metric types take
a lock on every update (docs/performance.md, "Small per-message costs in the sidecar").
`REGISTRY` holds a collector that turns those numbers into metric families when /metrics
is scraped, on that same thread, beside prometheus_client's process, GC and platform
collectors. Nothing here may be updated from another thread.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class Count:
    """A counter's (or a gauge's) value."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount


class Timing:
    """A histogram of seconds: a count per bucket (not cumulative) and their sum."""

    __slots__ = ("_les", "bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: over every bound (+Inf)
        self.total = 0.0
        # `le` as prometheus_client's Histogram spells it ("1.0", "+Inf"): Prometheus 2
        # stores le="1" and le="1.0" as two series.
        self._les = [floatToGoString(bound) for bound in (*bounds, float("inf"))]

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1  # buckets are `le`
        self.total += seconds

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        buckets: list[tuple[str, float]] = []
        seen = 0
        for le, count in zip(self._les, self.counts, strict=True):
            seen += count
            buckets.append((le, seen))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.total)


class _Labelled:
    """A counter with one label: a Count per label value, made on first use."""

    def __init__(self, name: str, doc: str, label: str) -> None:
        self.name, self.doc, self.label = name, doc, label
        self.children: dict[str, Count] = {}

    def labels(self, value: str) -> Count:
        child = self.children.get(value)
        if child is None:
            child = self.children[value] = Count()
        return child

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.doc, labels=(self.label,))
        for value, child in sorted(self.children.items()):
            family.add_metric((value,), child.value)
        return family


MESSAGES = _Labelled(
    "kre_sidecar_messages",
    "Input messages settled, by outcome (published, acked, skipped_replied, "
    "error_published, error_forwarded, retried, suspect, culprit_retried, dead_lettered, "
    "dead_letter_retried, settle_failed, abandoned).",
    "outcome",
)
IN_FLIGHT = Count()
HANDLER_SECONDS = Timing(
    (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
)
PUBLISHED = _Labelled(
    "kre_sidecar_published",
    "Envelopes published to JetStream, by kind (output, error, early_reply).",
    "kind",
)
PUBLISH_SECONDS = Timing((0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5))
REDELIVERIES = Count()
BYTES = _Labelled(
    "kre_sidecar_bytes",
    "Message bytes as they travel on NATS: in (fetched inputs), out (published).",
    "direction",
)
COMPRESSIONS = _Labelled(
    "kre_sidecar_compressions",
    "Gzipped envelopes: decompressed (inputs) and compressed (outputs over the limit).",
    "direction",
)

BYTES_IN = BYTES.labels("in")
BYTES_OUT = BYTES.labels("out")
DECOMPRESSED = COMPRESSIONS.labels("decompressed")
COMPRESSED = COMPRESSIONS.labels("compressed")


def published(kind: str) -> Count:
    """The PUBLISHED count for `kind`."""
    return PUBLISHED.labels(kind)


def settled(outcome: str) -> Count:
    """The MESSAGES count for `outcome`."""
    return MESSAGES.labels(outcome)


class SidecarCollector(Collector):
    """The numbers above as metric families, read when the registry is collected."""

    def collect(self) -> Iterator[Metric]:
        yield MESSAGES.family()
        yield GaugeMetricFamily(
            "kre_sidecar_in_flight",
            "Input messages being processed right now.",
            value=IN_FLIGHT.value,
        )
        yield HANDLER_SECONDS.family(
            "kre_sidecar_handler_seconds",
            "Time from handing a message to the handler host to getting its result.",
        )
        yield PUBLISHED.family()
        yield PUBLISH_SECONDS.family(
            "kre_sidecar_publish_seconds",
            "Time from a JetStream publish to its PubAck.",
        )
        yield CounterMetricFamily(
            "kre_sidecar_redeliveries",
            "Input messages fetched again (delivery attempt > 1).",
            value=REDELIVERIES.value,
        )
        yield BYTES.family()
        yield COMPRESSIONS.family()


# The sidecar's own registry, not prometheus_client's global one: what it serves is
# exactly these collectors, whatever else is imported into the process.
REGISTRY = CollectorRegistry()
REGISTRY.register(SidecarCollector())
ProcessCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
