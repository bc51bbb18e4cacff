"""The sidecar's /metrics: what the message path counts is what Prometheus reads.

The message path keeps plain numbers; a collector in the sidecar's own registry turns
them into metric families. These tests read what the /metrics route serves with
prometheus_client's text parser, as a Prometheus server would.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from sidecar import metrics
from sidecar.http import HealthServer

Key = tuple[str, frozenset[tuple[str, str]]]


def get_metrics() -> tuple[str, str, bytes]:
    """The /metrics route's (status, content type, body), as the HTTP server answers it."""
    server = HealthServer("127.0.0.1", 0, alive=lambda: (True, ""), ready=lambda: (True, ""))
    return server._route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")


def scrape() -> str:
    return get_metrics()[2].decode()


def samples() -> dict[Key, float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(scrape())
        for sample in family.samples
    }


def value(name: str, **labels: str) -> float:
    return samples().get((name, frozenset(labels.items())), 0.0)


def test_the_route_serves_the_sidecar_registry_as_text_0_0_4() -> None:
    status, content_type, body = get_metrics()
    assert status == "200 OK"
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert body.startswith(b"# HELP kre_sidecar_messages_total ")
    assert b"_created" not in body


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
    text = scrape()
    prefix = f'{name}_bucket{{le="'
    return [
        line[len(prefix) :].split('"', 1)[0]
        for line in text.splitlines()
        if line.startswith(prefix)
    ]


def test_the_exposition_names_every_documented_family() -> None:
    text = scrape()
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


Number = metrics.Count | metrics.Timing | metrics._Labelled
NUMBERS = sorted(
    (name, number) for name, number in vars(metrics).items() if isinstance(number, Number)
)


def test_the_module_keeps_the_numbers_the_message_path_updates() -> None:
    names = {name for name, _ in NUMBERS}
    assert {"MESSAGES", "IN_FLIGHT", "HANDLER_SECONDS", "REDELIVERIES", "BYTES_IN"} <= names


@pytest.mark.parametrize(("name", "number"), NUMBERS, ids=[name for name, _ in NUMBERS])
def test_every_number_the_message_path_keeps_is_collected(name: str, number: Number) -> None:
    before = _sidecar_samples()
    undo = _update(number)
    try:
        after = _sidecar_samples()
    finally:
        undo()
    changed = {key for key, seen in after.items() if before.get(key) != seen}
    assert changed, f"metrics.{name} is updated by the message path but not collected"


def _sidecar_samples() -> dict[Key, float]:
    return {key: seen for key, seen in samples().items() if key[0].startswith("kre_sidecar_")}


def _update(number: Number) -> Callable[[], object]:
    """Update `number` as the message path would; return what takes the update back."""
    if isinstance(number, metrics._Labelled):
        number.labels("collect-probe").inc()
        return lambda: number.children.pop("collect-probe")
    if isinstance(number, metrics.Count):
        number.inc()
        return number.dec
    counts, total = list(number.counts), number.total
    number.observe(0.01)

    def restore() -> None:
        number.counts[:], number.total = counts, total

    return restore


def test_every_family_parses_and_says_its_type() -> None:
    text = scrape()
    assert text.endswith("\n")
    families = {family.name: family.type for family in text_string_to_metric_families(text)}
    assert families["kre_sidecar_messages"] == "counter"
    assert families["kre_sidecar_in_flight"] == "gauge"
    assert families["kre_sidecar_handler_seconds"] == "histogram"
    assert families["process_resident_memory_bytes"] == "gauge"
    assert families["python_gc_collections"] == "counter"


@pytest.mark.parametrize("odd", ['a "quoted" kind', "a back\\slash", "two\nlines"])
def test_label_values_are_escaped(odd: str) -> None:
    metrics.published(odd).inc()
    try:
        assert value("kre_sidecar_published_total", kind=odd) == 1
    finally:
        del metrics.PUBLISHED.children[odd]


class _One:
    def __init__(self, family: metrics._Labelled) -> None:
        self.family = family

    def collect(self) -> list[Metric]:
        return [self.family.family()]


def test_help_text_is_escaped() -> None:
    family = metrics._Labelled("kre_test_escapes", "a back\\slash\nand a second line", "l")
    family.labels("x").inc()
    registry = CollectorRegistry()
    registry.register(_One(family))
    [parsed] = text_string_to_metric_families(generate_latest(registry).decode())
    assert parsed.documentation == "a back\\slash\nand a second line"
    assert parsed.samples[0].value == 1


def test_process_families_read_this_process() -> None:
    with open("/proc/self/status") as status:
        rss_kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
    assert value("process_resident_memory_bytes") == pytest.approx(rss_kb * 1024, rel=0.2)
    assert value("process_virtual_memory_bytes") > value("process_resident_memory_bytes")
    started = value("process_start_time_seconds")
    assert time.time() - 3600 < started <= time.time()
    assert 0 < value("process_cpu_seconds_total") <= time.process_time() + 1
    assert value("process_open_fds") == pytest.approx(len(os.listdir("/proc/self/fd")), abs=3)
    assert value("process_max_fds") == resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def test_python_info_names_this_interpreter() -> None:
    major, minor, patch = platform.python_version_tuple()
    labels = {
        "implementation": platform.python_implementation(),
        "major": major,
        "minor": minor,
        "patchlevel": patch,
        "version": platform.python_version(),
    }
    assert value("python_info", **labels) == 1.0
    assert value("python_gc_collections_total", generation="0") > 0
