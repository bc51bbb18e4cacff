"""Watching a handler host: Prometheus metrics, tagged log lines, trace context, reflection."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import wrappers_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from handler_host import logs, metrics
from handler_host.context import pack_any
from handler_host.testing import HandlerFailed, HandlerNode, serve_node
from protos import kre_nats_msg_pb2, runner_pb2, runner_pb2_grpc
from protos.contract import SERVICE_NAME

ROOT = Path(__file__).resolve().parents[2]
CONSOLE_SCRIPT = Path(sys.executable).parent / "kre-handler-host"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SECRET_NAME = "Zyxwvut-never-logged"

HANDLER = """
import asyncio
import logging
from google.protobuf import wrappers_pb2
from handler_host import RetryableError

async def init(ctx):
    await asyncio.sleep(0.01)

async def handler(ctx, data):
    text = wrappers_pb2.StringValue()
    data.Unpack(text)
    ctx.logger.info("working")
    logging.getLogger("user.module").info("a plain logger, same task")
    match text.value:
        case "raise":
            raise KeyError("no such row")
        case "retry":
            raise RetryableError("database busy")
        case "none":
            return None
        case "early":
            await ctx.early_reply(wrappers_pb2.StringValue(value="soon"))
    return wrappers_pb2.StringValue(value=ctx.tracking_id)
"""


def text(value: str) -> wrappers_pb2.StringValue:
    return wrappers_pb2.StringValue(value=value)


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[HandlerNode]:
    (tmp_path / "handler.py").write_text(textwrap.dedent(HANDLER))
    async with serve_node(tmp_path / "handler.py", node_name="scorer") as started:
        yield started


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """The root logger's lines in JSON, as KRT_LOG_FORMAT=json writes them."""
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = logs.configure("json", "INFO", node="scorer", stream=stream)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def parsed(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_metrics_count_outcomes_errors_and_early_replies(node: HandlerNode) -> None:
    before = {
        "payload": sample("kre_handler_host_handler_seconds_count", outcome="payload"),
        "none": sample("kre_handler_host_handler_seconds_count", outcome="none"),
        "retryable": sample("kre_handler_host_handler_seconds_count", outcome="retryable"),
        "key": sample("kre_handler_host_errors_total", type="KeyError"),
        "early": sample("kre_handler_host_early_replies_total"),
    }
    await node.call(text("plain"))
    await node.call(text("early"))
    await node.call(text("none"))
    for value in ("raise", "retry"):
        with pytest.raises(HandlerFailed):
            await node.call(text(value))

    assert sample("kre_handler_host_handler_seconds_count", outcome="payload") == (
        before["payload"] + 2
    )
    assert sample("kre_handler_host_handler_seconds_count", outcome="none") == before["none"] + 1
    assert sample("kre_handler_host_handler_seconds_count", outcome="retryable") == (
        before["retryable"] + 1
    )
    assert sample("kre_handler_host_errors_total", type="KeyError") == before["key"] + 1
    assert sample("kre_handler_host_early_replies_total") == before["early"] + 1
    assert sample("kre_handler_host_in_flight") == 0
    assert sample("kre_handler_host_init_seconds") >= 0.01  # init slept 10 ms


async def test_metrics_server_serves_the_registry() -> None:
    server = metrics.MetricsServer.start("127.0.0.1", 0)
    assert server is not None
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
    finally:
        await server.close()

    page = body.decode()
    for name in (
        "kre_handler_host_handler_seconds_bucket",
        "kre_handler_host_errors_total",
        "kre_handler_host_early_replies_total",
        "kre_handler_host_in_flight",
        "kre_handler_host_init_seconds",
        "process_resident_memory_bytes",
    ):
        assert name in page, name


def test_a_metrics_port_in_use_logs_an_error_and_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert metrics.MetricsServer.start("127.0.0.1", taken.getsockname()[1]) is None
    assert "metrics are off: cannot listen on 127.0.0.1" in caplog.text


async def test_log_lines_about_a_delivery_carry_its_tags(
    node: HandlerNode, json_lines: io.StringIO
) -> None:
    with pytest.raises(HandlerFailed):
        await node.call(
            text("raise"), tracking_id="t-7", attempt=3, headers={"traceparent": TRACEPARENT}
        )

    lines = [line for line in parsed(json_lines) if line.get("tracking_id") == "t-7"]
    by_logger = {line["logger"]: line for line in lines}
    assert set(by_logger) >= {"kre.user", "user.module", "handler_host.dispatch"}
    for line in lines:
        assert (line["node"], line["attempt"], line["traceparent"]) == ("scorer", 3, TRACEPARENT)
    assert by_logger["kre.user"]["msg"] == "working"  # the text prefix is not in JSON
    assert by_logger["handler_host.dispatch"]["level"] == "ERROR"


async def test_text_lines_about_a_delivery_start_with_its_tags(node: HandlerNode) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = logs.configure("text", "INFO", node="scorer", stream=stream)
    try:
        await node.call(text("plain"), tracking_id="t-8", attempt=2)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)

    out = stream.getvalue()
    assert "kre.user: [node=scorer tracking_id=t-8 attempt=2] working" in out
    assert "user.module: [node=scorer tracking_id=t-8 attempt=2] a plain logger" in out


async def test_handle_takes_trace_context_from_grpc_metadata(
    node: HandlerNode, json_lines: io.StringIO
) -> None:
    delivery = runner_pb2.Delivery(
        id=1, attempt=1, message=kre_nats_msg_pb2.KreNatsMessage(payload=pack_any(text("x")))
    )
    metadata = (("traceparent", TRACEPARENT), ("kre-tracking-id", "from-metadata"))

    reply = await node.stub.Handle(delivery, metadata=metadata)

    answer = wrappers_pb2.StringValue()
    assert reply.result.payload.Unpack(answer)
    assert answer.value == "from-metadata"  # ctx.tracking_id
    (line,) = [line for line in parsed(json_lines) if line.get("logger") == "kre.user"]
    assert (line["tracking_id"], line["traceparent"]) == ("from-metadata", TRACEPARENT)


async def test_process_stream_headers_reach_the_log_lines(
    node: HandlerNode, json_lines: io.StringIO
) -> None:
    deliveries = [
        runner_pb2.Delivery(
            id=i,
            attempt=i,
            message=kre_nats_msg_pb2.KreNatsMessage(
                tracking_id=f"p-{i}", payload=pack_any(text("plain"))
            ),
            headers={"traceparent": TRACEPARENT} if i == 1 else {"traceparent": "garbage"},
        )
        for i in (1, 2)
    ]

    async def requests() -> AsyncIterator[runner_pb2.Delivery]:
        for delivery in deliveries:
            yield delivery

    events = [event async for event in node.stub.Process(requests())]

    assert len(events) == 2
    user = {
        line["tracking_id"]: line for line in parsed(json_lines) if line["logger"] == "kre.user"
    }
    assert (user["p-1"]["attempt"], user["p-1"]["traceparent"]) == (1, TRACEPARENT)
    assert user["p-2"]["attempt"] == 2
    assert "traceparent" not in user["p-2"]  # not a W3C traceparent: left out


async def test_reflection_describes_the_handler_host(node: HandlerNode) -> None:
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    def describe() -> tuple[set[str], list[str]]:
        with grpc.insecure_channel(node.host.target) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            services = set(database.get_services())
            service = DescriptorPool(database).FindServiceByName(SERVICE_NAME)
            return services, [method.name for method in service.methods]

    services, methods = await asyncio.to_thread(describe)

    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services
    assert methods == ["Process", "ProcessBatch", "Handle"]


@pytest.fixture
def json_host(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, int, Path]]:
    """``kre-handler-host`` serving the greeter, logging JSON, metrics on a free port."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRT_")}
    env |= {
        "KRT_BASE_PATH": str(ROOT / "examples" / "greeter"),
        "KRT_HANDLER_PATH": "handler.py",
        "KRT_NODE_NAME": "greeter",
        "KRT_HANDLER_ADDRESS": f"unix://{tmp_path}/handler.sock",
        "KRT_LOG_FORMAT": "json",
        "KRT_METRICS_HOST": "127.0.0.1",
        "KRT_METRICS_PORT": str(port),
    }
    command = (
        [str(CONSOLE_SCRIPT)]
        if CONSOLE_SCRIPT.exists()
        else [sys.executable, "-m", "handler_host.main"]
    )
    stderr_path = tmp_path / "stderr.log"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(command, env=env, cwd=tmp_path, stderr=stderr)
    try:
        yield proc, env["KRT_HANDLER_ADDRESS"], port, stderr_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_real_process_json_logs_and_metrics(
    json_host: tuple[subprocess.Popen[bytes], str, int, Path],
) -> None:
    proc, address, port, stderr_path = json_host
    await _greet_twice(address)
    url = f"http://127.0.0.1:{port}/metrics"
    page = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
    proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(proc.wait, 30)

    log = stderr_path.read_text()
    assert code == 0, log
    assert SECRET_NAME not in log  # never the payload
    lines = [json.loads(line) for line in log.splitlines()]  # every line is JSON
    assert all(line["node"] == "greeter" for line in lines)
    (user,) = [line for line in lines if line["logger"] == "kre.user"]
    assert user["msg"] == "greeting one visitor"
    assert (user["tracking_id"], user["attempt"], user["traceparent"]) == ("t-1", 2, TRACEPARENT)
    (error,) = [line for line in lines if line["level"] == "ERROR"]
    assert (error["tracking_id"], error["attempt"]) == ("t-2", 1)
    assert 'kre_handler_host_errors_total{type="ValueError"} 1.0' in page.decode()
    assert 'kre_handler_host_handler_seconds_count{outcome="payload"} 1.0' in page.decode()


async def _greet_twice(address: str) -> None:
    sys.path.insert(0, str(ROOT / "examples" / "greeter"))
    try:
        from public_input_pb2 import Request
    finally:
        sys.path.pop(0)
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = asyncio.get_running_loop().time() + 60
        while True:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.aio.AioRpcError:
                pass
            assert asyncio.get_running_loop().time() < deadline, "the host never got SERVING"
            await asyncio.sleep(0.1)
        stub = runner_pb2_grpc.HandlerHostStub(channel)
        for tracking_id, name, attempt in (("t-1", SECRET_NAME, 2), ("t-2", "", 1)):
            message = kre_nats_msg_pb2.KreNatsMessage(
                tracking_id=tracking_id, payload=pack_any(Request(name=name))
            )
            headers = {"traceparent": TRACEPARENT} if name else {}
            delivery = runner_pb2.Delivery(id=1, message=message, attempt=attempt, headers=headers)
            await stub.Handle(delivery, timeout=30)


async def test_reflection_knows_the_users_message_types() -> None:
    # grpcurl resolves the "@type" of an Any payload through reflection: the types the
    # handler module imported are in the host's descriptor pool, so they resolve too.
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    def fields(target: str) -> list[str]:
        with grpc.insecure_channel(target) as channel:
            pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
            return [field.name for field in pool.FindMessageTypeByName("greeter.Request").fields]

    async with serve_node(ROOT / "examples" / "greeter" / "handler.py") as greeter:
        assert await asyncio.to_thread(fields, greeter.host.target) == ["name"]
