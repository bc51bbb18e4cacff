"""The sidecar's /metrics: what the message path counts is what Prometheus reads."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY, generate_latest

from sidecar import metrics


def value(name: str, **labels: str) -> float:
    found = REGISTRY.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_counts_by_label_show_as_prometheus_counters() -> None:
    before = value("kre_sidecar_messages_total", outcome="published")
    metrics.settled("published").inc()
    metrics.settled("published").inc()
    assert value("kre_sidecar_messages_total", outcome="published") == before + 2

    out = value("kre_sidecar_bytes_total", direction="out")
    metrics.BYTES_OUT.inc(120)
    assert value("kre_sidecar_bytes_total", direction="out") == out + 120

    redelivered = value("kre_sidecar_redeliveries_total")
    metrics.REDELIVERIES.inc()
    assert value("kre_sidecar_redeliveries_total") == redelivered + 1


def test_in_flight_is_a_gauge_that_goes_down() -> None:
    before = value("kre_sidecar_in_flight")
    metrics.IN_FLIGHT.inc()
    metrics.IN_FLIGHT.inc()
    metrics.IN_FLIGHT.dec()
    assert value("kre_sidecar_in_flight") == before + 1
    metrics.IN_FLIGHT.dec()


@pytest.mark.parametrize(
    ("seconds", "first_bucket"),
    [(0.003, "0.005"), (0.005, "0.005"), (0.0004, "0.001"), (999, "+Inf")],
)
def test_a_timing_lands_in_every_bucket_from_its_own_up(seconds: float, first_bucket: str) -> None:
    name = "kre_sidecar_handler_seconds"
    les = _bucket_labels(name)
    assert len(les) == len(metrics.HANDLER_SECONDS.bounds) + 1  # and +Inf
    before = {le: value(f"{name}_bucket", le=le) for le in les}
    count, total = value(f"{name}_count"), value(f"{name}_sum")

    metrics.HANDLER_SECONDS.observe(seconds)

    first = les.index(first_bucket)
    for i, le in enumerate(les):
        assert value(f"{name}_bucket", le=le) == before[le] + (1 if i >= first else 0), le
    assert value(f"{name}_count") == count + 1
    assert value(f"{name}_sum") == pytest.approx(total + seconds)


def _bucket_labels(name: str) -> list[str]:
    text = generate_latest().decode()
    prefix = f'{name}_bucket{{le="'
    return [
        line[len(prefix) :].split('"', 1)[0]
        for line in text.splitlines()
        if line.startswith(prefix)
    ]


def test_the_exposition_names_every_documented_family() -> None:
    text = generate_latest().decode()
    for family, kind in (
        ("kre_sidecar_messages_total", "counter"),
        ("kre_sidecar_in_flight", "gauge"),
        ("kre_sidecar_handler_seconds", "histogram"),
        ("kre_sidecar_published_total", "counter"),
        ("kre_sidecar_publish_seconds", "histogram"),
        ("kre_sidecar_redeliveries_total", "counter"),
        ("kre_sidecar_bytes_total", "counter"),
        ("kre_sidecar_compressions_total", "counter"),
    ):
        assert f"# TYPE {family} {kind}\n" in text, family
