"""ctx.measurement against a real InfluxDB write endpoint (VictoriaMetrics), read back
through its export API; and against a stopped or silent server."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from deploy.local.influx import InfluxServer, Series
from handler_host.services import Services, ServiceSettings
from handler_host.services.influx import Measurements, new_measurements

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

MOMENT = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
MOMENT_MS = 1704164645678


def measurements(uri: str, **tuning: Any) -> Measurements:
    options: dict[str, Any] = {"flush_interval_s": 0.05, "timeout_s": 2.0, **tuning}
    return new_measurements(
        uri, bucket="kre", org="", token="", version="v1", workflow="wf", node="n2", **options
    )


def by_name(series: list[Series]) -> dict[str, Series]:
    return {s.name: s for s in series}


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and then never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


def test_points_read_back_with_their_tags_and_fields(
    influx_server: InfluxServer, unique: str
) -> None:
    measurement = measurements(influx_server.uri)
    try:
        measurement.save(
            unique,
            {"load": 1.5, "count": 3, "ok": True, "label": "text"},
            {"host": "web 1", "zone": "eu,west"},
            MOMENT,
        )
        measurement.save(unique, {"load": 2.25}, {"host": "web 2"}, MOMENT, measurement.PRECISION_S)
        assert measurement.flush(5)
        assert measurement.stats.written == 2
        found = influx_server.wait_for_series(f'{{__name__=~"{unique}_(load|count|ok)"}}', 4)
    finally:
        measurement.close()

    load = sorted((s for s in found if s.name == f"{unique}_load"), key=lambda s: s.labels["host"])
    assert [s.labels for s in load] == [
        {"host": "web 1", "zone": "eu,west", "version": "v1"},
        {"host": "web 2", "version": "v1"},
    ]
    assert [(s.values, s.timestamps_ms) for s in load] == [
        ([1.5], [MOMENT_MS]),
        ([2.25], [MOMENT_MS // 1000 * 1000]),  # saved with second precision
    ]
    others = by_name([s for s in found if s.name != f"{unique}_load"])
    assert others[f"{unique}_count"].values == [3]
    assert others[f"{unique}_ok"].values == [1]  # bools are kept as 0/1
    assert others[f"{unique}_count"].labels["version"] == "v1"


async def test_services_write_to_the_configured_uri(
    influx_server: InfluxServer, unique: str
) -> None:
    settings = ServiceSettings.from_env({"KRT_INFLUX_URI": influx_server.uri})
    services = Services.from_settings(settings, "vid", "v9", "wf", "node")
    assert services.measurement is not None
    services.measurement.save(unique, {"value": 7}, {"t": "x"})
    await services.close()  # flushes
    assert services.measurement.stats.written == 1
    found = influx_server.wait_for_series(f'{{__name__="{unique}_value"}}')
    assert [(s.labels, s.values) for s in found] == [({"t": "x", "version": "v9"}, [7])]


def test_record_node_elapsed_points(influx_server: InfluxServer, unique: str) -> None:
    measurement = new_measurements(
        influx_server.uri,
        bucket="kre",
        org="",
        token="",
        version="v1",
        workflow=unique,
        node="n2",
        flush_interval_s=0.05,
    )
    start = datetime.now(UTC)
    try:
        measurement.record_node_elapsed(
            tracking_id="track-1",
            node_from="n1",
            start=start,
            end=start + timedelta(milliseconds=120),
            previous_end=start - timedelta(milliseconds=30),
        )
        measurement.record_node_elapsed(
            tracking_id="track-2",
            node_from="n1",
            start=start,
            end=start + timedelta(milliseconds=80),
            previous_end=start - timedelta(milliseconds=10),
            workflow_start=start - timedelta(milliseconds=500),
        )
        assert measurement.flush(5)
        match = (
            f'{{__name__=~"(node|workflow)_elapsed_time_(elapsed|waiting)_ms",workflow="{unique}"}}'
        )
        found = by_name(influx_server.wait_for_series(match, count=3, samples=5))
    finally:
        measurement.close()

    node_labels = {"workflow": unique, "version": "v1", "node": "n2"}
    elapsed = found["node_elapsed_time_elapsed_ms"]
    assert elapsed.labels == node_labels
    assert sorted(elapsed.values) == [80, 120]
    waiting = found["node_elapsed_time_waiting_ms"]
    assert waiting.labels == node_labels
    assert sorted(waiting.values) == [10, 30]
    workflow = found["workflow_elapsed_time_elapsed_ms"]
    assert workflow.labels == {"workflow": unique, "version": "v1"}
    assert workflow.values == [580]


def test_a_stopped_server_never_slows_saves_and_failures_are_counted(unique: str) -> None:
    server = InfluxServer().start()
    measurement = measurements(server.uri, queue_size=500, batch_size=100)
    try:
        server.stop()
        started = time.monotonic()
        for i in range(2_000):
            measurement.save(unique, {"i": i}, {"k": "v"})
        assert time.monotonic() - started < 2.0  # about 20 us a save on a quiet machine
        assert measurement.flush(10)
        stats = measurement.stats
        assert stats.written == 0
        assert stats.failed > 0 and stats.failed_writes > 0
        assert stats.failed + stats.dropped == 2_000

        server.start()  # back on the same port: later points are written
        measurement.save(unique, {"i": -1}, {"k": "back"})
        assert measurement.flush(10)
        assert measurement.stats.written == 1
        found = server.wait_for_series(f'{{__name__="{unique}_i",k="back"}}')
        assert found[0].values == [-1]
    finally:
        measurement.close(timeout_s=5)
        server.close()


def test_a_silent_server_never_slows_saves_nor_shutdown(silent_port: int, unique: str) -> None:
    measurement = measurements(
        f"http://127.0.0.1:{silent_port}", timeout_s=0.5, queue_size=100, batch_size=10
    )
    started = time.monotonic()
    for i in range(1_000):
        measurement.save(unique, {"i": i}, {})
    # Writing in the caller would take 0.5 s per batch of 10: 50 s.
    assert time.monotonic() - started < 2.0
    assert measurement.stats.dropped >= 800  # the queue stays bounded
    started = time.monotonic()
    measurement.close(timeout_s=2)
    assert time.monotonic() - started < 3
    stats = measurement.stats
    assert stats.written == 0 and stats.queued == 0
    assert stats.failed + stats.dropped == 1_000
