"""The split runner under test: a LocalNode (sidecar + handler host) with the echo handler.

Backlog cases ("all at once", 100 KB, 2 MB): all N inputs are published into the stream
first, with no consumer running; then both processes are started, and the rate is
N / (the last output's stored time - the moment the sidecar could first fetch: the latest
of its log lines saying the handler host is SERVING, a stream to it open and the
consumer bound: what its fetch loop waits on). The start of the processes is left out; the
baseline is timed the same way (from its consumer's bind). Polling /readyz instead would
start the clock late by up to a poll, and a small backlog could be done before it.
Cases with a `latency_count` then send that many more, one at a time, to the same node
for p50/p99. The one-at-a-time case starts the node, waits for /readyz, and only then
sends.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from nats.aio.client import Client
from nats.js import JetStreamContext

from bench.cases import Case, Mode, Workload
from bench.latency import one_at_a_time, percentile
from bench.procstat import Sampler
from bench.report import Row
from bench.stream import (
    delete_stream,
    drain_rate,
    fresh_stream,
    publish_all,
    read_outputs,
    tally,
    wait_consumed,
)
from deploy.local.nats import NatsServer
from deploy.local.node import LocalNode, NodeConfig

HANDLERS = Path(__file__).parent / "handlers"
NODE = "echo"
WARMUP = 50
READY_POLL = 0.005
HEALTH_EVERY = 1.0


@dataclass
class Setup:
    """What every measurement shares."""

    server: NatsServer
    nc: Client
    js: JetStreamContext
    handler: str = "echo.py"
    extra_env: dict[str, str] = field(default_factory=dict)
    logs: Path | None = None  # keep each node's logs here

    def node_config(self, stream: str) -> NodeConfig:
        return NodeConfig(
            nats_url=self.server.url,
            stream=stream,
            base_path=HANDLERS,
            handler_path=self.handler,
            node_name=NODE,
            # JSON logs: the rate's start is read from the sidecar's (`fetching_since`).
            extra={**self.extra_env, "KRT_LOG_FORMAT": "json"},
        )

    def run_dir(self, name: str) -> Path | None:
        return None if self.logs is None else self.logs / name


def drain_timeout(count: int, payload_bytes: int) -> float:
    """Generous: a slow run is still a result, a hung one is not."""
    return 60 + count * (0.01 + payload_bytes / 2e6)


class NodeWatch:
    """Raises when the node broke: a process exited, or the sidecar's /healthz says its
    consumer loop died (checked at most once a second: it costs the sidecar a request).
    The caller prints the node's logs."""

    def __init__(self, node: LocalNode) -> None:
        self.node = node
        self._next_probe = 0.0

    def __call__(self) -> None:
        node = self.node
        for proc, name in ((node.host, "handler host"), (node.sidecar, "sidecar")):
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the {name} exited with {proc.returncode}")
        now = time.monotonic()
        if now < self._next_probe:
            return
        self._next_probe = now + HEALTH_EVERY
        if node.http_status("/healthz") not in (0, 200):
            raise RuntimeError("the sidecar's /healthz says its consumer loop is dead")


async def run_split(setup: Setup, case: Case) -> Row:
    stream = f"bench-{case.key}-{uuid.uuid4().hex[:8]}"
    config = setup.node_config(stream)
    await fresh_stream(setup.js, stream, config.subjects)
    node = LocalNode(config, setup.run_dir(f"{case.key}-split"))
    try:
        if case.mode is Mode.ONE_AT_A_TIME:
            return await _one_at_a_time(setup, case, config, node)
        return await _backlog(setup, case, config, node)
    except Exception:
        print(node.logs(60), file=sys.stderr)
        raise
    finally:
        node.close()
        await delete_stream(setup.js, stream)


async def until_ready(node: LocalNode, alive: Callable[[], None], timeout: float = 60) -> None:
    """Until /readyz says 200: the consumer is bound and the handler host SERVING."""
    deadline = time.monotonic() + timeout
    while node.http_status("/readyz") != 200:
        alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the node was not ready in {timeout:.0f}s")
        await asyncio.sleep(READY_POLL)


# What the sidecar's fetch loop waits on, as its log lines say it: the handler host
# SERVING with a stream to it open (the channel's readiness), and the consumer bound.
READY_LINES = {
    "the handler host SERVING": re.compile(r"^handler host at \S+ is SERVING$"),
    "a stream to the handler host open": re.compile(r"^\w+ stream to the handler host opened$"),
    "the consumer bound": re.compile(r"^consuming \S+ from stream \S+ as durable consumer \S+$"),
}


def fetching_since(sidecar_log: Path) -> float:
    """The epoch time the sidecar could first fetch: the latest of the first lines of its
    JSON log saying each of READY_LINES (millisecond timestamps)."""
    first: dict[str, float] = {}
    for line in sidecar_log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        msg = entry.get("msg", "") if isinstance(entry, dict) else ""
        for what, pattern in READY_LINES.items():
            if what not in first and pattern.search(msg):
                first[what] = datetime.fromisoformat(entry["ts"]).timestamp()
    missing = [what for what in READY_LINES if what not in first]
    if missing:
        raise RuntimeError(
            f"{sidecar_log} has no line saying {' or '.join(missing)}, which the rate is "
            "timed from: the sidecar's log lines changed, or it did not log them (JSON, at INFO "
            "or below: no --env KRT_LOG_LEVEL=WARNING)"
        )
    return max(first.values())


def _sampler(setup: Setup, node: LocalNode) -> Sampler:
    assert node.sidecar is not None and node.host is not None
    pids = {"sidecar": node.sidecar.pid, "host": node.host.pid}
    if setup.server.proc is not None:
        pids["nats"] = setup.server.proc.pid
    return Sampler(pids)


async def _backlog(setup: Setup, case: Case, config: NodeConfig, node: LocalNode) -> Row:
    work = Workload(case.payload_bytes, case.count)
    last_seq = await publish_all(setup.js, config.input_subject, work.messages())
    probe = Workload(case.payload_bytes, case.latency_count, seed=7)
    node.start_host()
    node.start_sidecar()
    with _sampler(setup, node) as sampler:
        alive = NodeWatch(node)
        await until_ready(node, alive)
        timeout = drain_timeout(case.count, case.payload_bytes)
        await wait_consumed(setup.js, config.stream, NODE, last_seq, timeout, alive)
        started = fetching_since(node.run_dir / "sidecar.log")
        latencies: list[float] = []
        if probe.count:
            latencies, _, _ = await one_at_a_time(
                setup.nc,
                setup.js,
                config.input_subject,
                config.output_subject,
                probe.messages(),
                healthy=alive,
            )
    outputs = await read_outputs(setup.js, config.stream, config.output_subject, work.wire_bytes())
    backlog = [o for o in outputs if o.tracking_id in work.expected]
    rate, end = drain_rate(backlog, started)
    return Row(
        case=case,
        impl="split",
        count=case.count,
        wire_bytes=work.wire_bytes(),
        tally=tally({**work.expected, **probe.expected}, outputs),
        rate=rate,
        latencies=len(latencies),
        p50_ms=_ms(percentile(latencies, 50)),
        p99_ms=_ms(percentile(latencies, 99)),
        usage=sampler.summary(started, end),
    )


async def _one_at_a_time(setup: Setup, case: Case, config: NodeConfig, node: LocalNode) -> Row:
    warmup = min(WARMUP, case.count)
    work = Workload(case.payload_bytes, warmup + case.count)
    node.start()
    with _sampler(setup, node) as sampler:
        latencies, start, end = await one_at_a_time(
            setup.nc,
            setup.js,
            config.input_subject,
            config.output_subject,
            work.messages(),
            warmup=warmup,
            healthy=NodeWatch(node),
        )
    outputs = await read_outputs(setup.js, config.stream, config.output_subject, work.wire_bytes())
    return Row(
        case=case,
        impl="split",
        count=case.count,
        wire_bytes=work.wire_bytes(),
        tally=tally(work.expected, outputs),
        rate=len(latencies) / (end - start) if end > start else None,
        latencies=len(latencies),
        p50_ms=_ms(percentile(latencies, 50)),
        p99_ms=_ms(percentile(latencies, 99)),
        usage=sampler.summary(start, end),
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000
