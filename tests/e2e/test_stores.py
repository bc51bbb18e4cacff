"""The data services end to end: the demo's recorder node, real stores, real processes."""

from __future__ import annotations

import re
import sys
import time
import uuid
from pathlib import Path

import pytest
from pymongo import MongoClient

from deploy.local.client import Downstream, Upstream, request_envelope
from deploy.local.influx import InfluxServer
from deploy.local.mongo import MongoServer
from deploy.local.nats import NatsServer
from deploy.local.node import NodeConfig

GREETER = Path(__file__).resolve().parents[2] / "examples" / "greeter"
sys.path.insert(0, str(GREETER))
from public_input_pb2 import Response  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def recorder(nats: NatsServer, stream: str, mongo_uri: str, influx_uri: str, **extra: str):
    version = f"v{uuid.uuid4().hex[:8]}"  # keeps this test's points and documents apart
    env = {
        "KRT_MONGO_URI": mongo_uri,
        "KRT_INFLUX_URI": influx_uri,
        "KRT_MONGO_DB": version,
        **extra,
    }
    return NodeConfig(
        nats_url=nats.url,
        stream=stream,
        base_path=GREETER,
        handler_path="recorder.py",
        node_name="recorder",
        version=version,
        version_id=f"{version}-id",
        extra=env,
    )


def greetings(n: int) -> list:
    return [
        request_envelope(Response(greeting=f"Hello, n{i}!"), from_node="greeter") for i in range(n)
    ]


@pytest.fixture
async def recorder_stream(js, stream_name):
    yield stream_name
    await js.delete_stream(stream_name)


async def run_node(js, make_node, config: NodeConfig, requests: list, timeout: float = 60):
    from deploy.local.client import ensure_stream

    await ensure_stream(js, config.stream, config.subjects)
    make_node(config).start()
    downstream = await Downstream(
        js, config.stream, config.output_subject, config.entrypoint_subject
    ).start()
    await Upstream(js, config.input_subject).send_all(requests)
    await downstream.wait_for(len(requests), timeout)
    assert downstream.duplicates() == 0
    return downstream.by_tracking_id()


async def test_recorder_writes_documents_predictions_and_points(
    js,
    make_node,
    nats_server,
    recorder_stream,
    mongo_server: MongoServer,
    influx_server: InfluxServer,
):
    config = recorder(
        nats_server, recorder_stream, mongo_server.uri, influx_server.uri, KRT_IS_LAST_NODE="true"
    )
    requests = greetings(20)

    replies = await run_node(js, make_node, config, requests)

    assert all(not replies[r.tracking_id].error for r in requests)
    with MongoClient(mongo_server.uri, serverSelectionTimeoutMS=5000) as client:
        db = client[config.version]
        saved = {d["tracking_id"]: d for d in db["greetings"].find({})}
        predictions = list(db["classificationMetrics"].find({}))
    assert set(saved) == {r.tracking_id for r in requests}
    assert saved[requests[3].tracking_id]["greeting"] == "Hello, n3!"
    assert len(predictions) == 20
    for doc in predictions:
        assert doc["predictedValue"] == "en" and doc["trueValue"] == "en"
        assert doc["error"] == "" and doc["extra"]["greeting"].startswith("Hello, n")
        assert doc["versionId"] == config.version_id and doc["versionName"] == config.version
        assert RFC3339_UTC.match(doc["date"]), doc["date"]
    match = f'{{__name__="greetings_length",version="{config.version}"}}'
    series = influx_server.wait_for_series(match, samples=20, timeout=15)
    assert [s.labels["language"] for s in series] == ["en"]
    assert sorted(series[0].values) == sorted(float(len(f"Hello, n{i}!")) for i in range(20))
    # KRE's per-message timing: this node's, and the whole workflow's on the last node
    version = f'version="{config.version}"'
    elapsed = influx_server.wait_for_series(
        f'{{__name__="node_elapsed_time_elapsed_ms",{version}}}', samples=20, timeout=15
    )
    assert elapsed[0].labels == {"workflow": "demo", "version": config.version, "node": "recorder"}
    assert all(0 <= ms < 10_000 for ms in elapsed[0].values)
    waiting = influx_server.wait_for_series(
        f'{{__name__="node_elapsed_time_waiting_ms",{version}}}', samples=20, timeout=15
    )
    assert all(ms >= 0 for ms in waiting[0].values)
    influx_server.wait_for_series(
        f'{{__name__="workflow_elapsed_time_elapsed_ms",{version}}}', samples=20, timeout=15
    )


async def test_mongo_down_gives_error_envelopes_within_the_timeout(
    js, make_node, nats_server, recorder_stream, influx_server: InfluxServer
):
    stopped = MongoServer().start()
    stopped.close()  # a port where MongoDB was and no longer answers
    config = recorder(
        nats_server, recorder_stream, stopped.uri, influx_server.uri, KRT_MONGO_TIMEOUT="1"
    )
    requests = greetings(5)

    started = time.monotonic()
    replies = await run_node(js, make_node, config, requests, timeout=30)
    elapsed = time.monotonic() - started

    assert len(replies) == 5
    for request in requests:
        error = replies[request.tracking_id].error
        assert error.startswith("error in 'recorder': [ctx.db.save] MongoDB at 127.0.0.1:"), error
        assert "did not answer within 1 s (KRT_MONGO_TIMEOUT)" in error
    assert elapsed < 25, f"five messages against a down store took {elapsed:.0f}s"
    info = await js.consumer_info(config.stream, "recorder")
    assert info.num_ack_pending == 0 and info.num_redelivered == 0


async def test_influx_down_loses_nothing_and_handling_goes_on(
    js, make_node, nats_server, recorder_stream, mongo_server: MongoServer
):
    stopped = InfluxServer().start()
    stopped.close()
    config = recorder(nats_server, recorder_stream, mongo_server.uri, stopped.uri)
    requests = greetings(200)

    replies = await run_node(js, make_node, config, requests, timeout=60)

    assert len(replies) == 200
    assert all(not replies[r.tracking_id].error for r in requests)
    with MongoClient(mongo_server.uri, serverSelectionTimeoutMS=5000) as client:
        assert client[config.version]["greetings"].count_documents({}) == 200
