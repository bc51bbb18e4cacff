"""A mixed KRE v1 workflow: entrypoint -> nodeA (kre-py) -> nodeB (this runner) -> nodeC (kre-py).

Nodes A and C run tests/e2e/kre_py_node.py (kre-py's message path, as a separate
process); node B is this runner, sidecar and handler host as subprocesses. The test plays
KRE's entrypoint as kre-entrypoint does: requests to the first node's subject with one
tracking entry of naive `utcnow().isoformat()` times, gzipped above 1 MiB, and replies
read from `<stream>.entrypoint`. The stream is shaped like KRE's: `<stream>.*`, interest
retention, so every consumer that reads from it is created before anything is published.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Self

import nats.errors
import pytest
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy

from deploy.local.nats import NatsServer
from deploy.local.node import LocalNode, NodeConfig
from deploy.local.procs import stop_process
from protos.kre_nats_msg_pb2 import KreNatsMessage
from tests.waiting import eventually

sys.path.append(str(Path(__file__).parent / "kre_mixed"))
from greeter_messages import Request, Response

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
HANDLERS = Path(__file__).parent / "kre_mixed"
VERSION = "greeter-v1"
MIB = 1024 * 1024
GZIP_MAGIC = b"\x1f\x8b"
# What this runner writes in a tracking entry: naive UTC, six fraction digits.
KRE_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}")
NAMES = [
    *("ada", "  grace  hopper ", "alan\tturing", "Barbara Liskov", " edsger ", "leslie lamport"),
    *("donald  e.  knuth", "frances allen", "ken thompson ", "   radia perlman", "John McCarthy"),
    "margaret\n hamilton",
]
LARGE_NAME = "  " + "ada  lovelace " * 110_000  # 1.5 MB: over 1 MiB at every hop


def normalized(name: str) -> str:
    return " ".join(name.split())


class KrePyNode:
    """One kre-py node as a subprocess: its points (stdout) and its log (stderr) in files."""

    def __init__(self, run_dir: Path, env: dict[str, str]) -> None:
        self.env = env
        self.name = env["KRT_NODE_NAME"]
        self.durable = f"{env['KRT_VERSION']}-{self.name}"
        self.points_path = run_dir / f"{self.name}.jsonl"
        self.log_path = run_dir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> KrePyNode:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KRT_")} | self.env
        with open(self.points_path, "ab") as out, open(self.log_path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.e2e.kre_py_node"],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=err,
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def points(self, measurement: str) -> list[dict[str, Any]]:
        lines = self.points_path.read_text().splitlines() if self.points_path.exists() else []
        points = [json.loads(line) for line in lines if line.strip()]
        return [p for p in points if p["measurement"] == measurement]

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


class Workflow:
    """The KRE names of one workflow's stream and subjects."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.entrypoint = f"{stream}.entrypoint"

    def subject(self, node: str) -> str:
        return f"{self.stream}.{node}"

    def kre_py_env(
        self, nats_url: str, node: str, output: str, handler: str, last: bool
    ) -> dict[str, str]:
        """The variables KRE gives a kre-py node (Mongo and Influx ones unused here)."""
        return {
            "KRT_WORKFLOW_NAME": "Greet",
            "KRT_RUNTIME_ID": "runtime1",
            "KRT_VERSION_ID": "v1-id",
            "KRT_VERSION": VERSION,
            "KRT_NODE_NAME": node,
            "KRT_NATS_SERVER": nats_url,
            "KRT_NATS_INPUT": self.subject(node),
            "KRT_NATS_OUTPUT": output,
            "KRT_NATS_STREAM": self.stream,
            "KRT_NATS_MONGO_WRITER": "mongo_writer",
            "KRT_NATS_ENTRYPOINT_SUBJECT": self.entrypoint,
            "KRT_BASE_PATH": str(HANDLERS),
            "KRT_HANDLER_PATH": handler,
            "KRT_MONGO_URI": "mongodb://unused:27017/admin",
            "KRT_INFLUX_URI": "http://unused:8086",
            "KRT_IS_LAST_NODE": "true" if last else "false",
        }


class Reader:
    """A durable pull consumer on some of the stream's subjects, created before any publish."""

    def __init__(self, js: JetStreamContext, stream: str, durable: str) -> None:
        self.js = js
        self.stream = stream
        self.durable = durable
        self.sub: Any = None

    async def start(self, subjects: list[str], ack: bool) -> Self:
        config = ConsumerConfig(
            durable_name=self.durable,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT if ack else AckPolicy.NONE,
            filter_subjects=subjects,
        )
        await self.js.add_consumer(self.stream, config=config)
        self.sub = await self.js.pull_subscribe_bind(self.durable, self.stream)
        return self

    async def fetch(self, timeout: float) -> list[Any]:
        try:
            return list(await self.sub.fetch(64, timeout=timeout))
        except (TimeoutError, nats.errors.TimeoutError):
            return []


class Entrypoint(Reader):
    """KRE's entrypoint: sends requests to node A, reads and acks replies."""

    def __init__(self, js: JetStreamContext, workflow: Workflow) -> None:
        super().__init__(js, workflow.stream, "entrypoint")
        self.workflow = workflow
        self.replies: list[tuple[bytes, KreNatsMessage]] = []

    async def send(self, name: str) -> KreNatsMessage:
        start = datetime.utcnow().isoformat()
        request = KreNatsMessage(tracking_id=str(uuid.uuid4()), reply=uuid.uuid4().hex)
        request.payload.Pack(Request(name=name))
        request.tracking.add(node_name="entrypoint", start=start, end=datetime.utcnow().isoformat())
        data = request.SerializeToString()
        if len(data) > MIB:
            data = gzip.compress(data, compresslevel=9)
            assert len(data) <= MIB, "kre-entrypoint refuses this request"
        await self.js.publish(self.workflow.subject("nodeA"), data, stream=self.stream)
        return request

    async def wait_replies(self, count: int, timeout: float) -> dict[str, KreNatsMessage]:
        """Until `count` replies came (then one more look for extras), each acked."""
        deadline = time.monotonic() + timeout
        while len(self.replies) < count and time.monotonic() < deadline:
            await self._take(await self.fetch(timeout=0.5))
        await self._take(await self.fetch(timeout=0.5))
        return {reply.tracking_id: reply for _, reply in self.replies}

    async def _take(self, msgs: list[Any]) -> None:
        for msg in msgs:
            data = gzip.decompress(msg.data) if msg.data[:2] == GZIP_MAGIC else msg.data
            self.replies.append((msg.data, KreNatsMessage.FromString(data)))
            await msg.ack()


class Observer(Reader):
    """Sees every envelope on the node subjects, as stored (gzip or not); acks nothing."""

    def __init__(self, js: JetStreamContext, stream: str) -> None:
        super().__init__(js, stream, "observer")
        self.seen: list[tuple[str, str, bool]] = []  # subject, tracking_id, gzipped

    async def wait_counts(self, counts: dict[str, int], timeout: float) -> Counter[str]:
        deadline = time.monotonic() + timeout
        seen: Counter[str] = Counter()
        while any(seen[s] < n for s, n in counts.items()) and time.monotonic() < deadline:
            for msg in await self.fetch(timeout=0.5):
                gzipped = msg.data[:2] == GZIP_MAGIC
                envelope = KreNatsMessage.FromString(
                    gzip.decompress(msg.data) if gzipped else msg.data
                )
                self.seen.append((msg.subject, envelope.tracking_id, gzipped))
                seen[msg.subject] += 1
        return seen

    def gzipped(self, subject: str, tracking_id: str) -> list[bool]:
        return [g for s, t, g in self.seen if s == subject and t == tracking_id]

    async def close(self) -> None:
        await self.sub.unsubscribe()
        await self.js.delete_consumer(self.stream, self.durable)


async def wait_kre_py_ready(js: JetStreamContext, stream: str, node: KrePyNode) -> None:
    """Until the node's push consumer is bound and its handler context exists.

    kre-py subscribes first and creates the context right after (no await between when
    there is no init), so a message that came earlier would fail on a missing context.
    """

    async def ready() -> bool:
        assert node.proc is not None and node.proc.poll() is None, node.log()
        if "Creating handler context" not in node.log():
            return False
        info = await js.consumer_info(stream, node.durable)
        return bool(info.push_bound)

    await eventually(ready, 30, f"kre-py {node.name} ready")


async def wait_settled(js: JetStreamContext, stream: str, durable: str) -> Any:
    """Until the consumer has nothing pending and nothing waiting for an ack."""
    infos: list[Any] = []

    async def settled() -> bool:
        infos.append(await js.consumer_info(stream, durable))
        return infos[-1].num_pending == 0 and infos[-1].num_ack_pending == 0

    await eventually(settled, 30, f"consumer {durable} settled")
    return infos[-1]


def greeting(envelope: KreNatsMessage) -> str:
    response = Response()
    assert envelope.payload.Unpack(response), envelope.payload.type_url
    return response.greeting


def tracking_names(envelope: KreNatsMessage) -> list[str]:
    return [t.node_name for t in envelope.tracking]


@pytest.fixture
def workflow() -> Workflow:
    return Workflow(f"runtime1-greeter-v1-Greet-{uuid.uuid4().hex[:6]}")


@pytest.fixture
async def stream(js: Any, workflow: Workflow) -> Any:
    await js.add_stream(
        name=workflow.stream,
        subjects=[f"{workflow.stream}.*"],
        retention=RetentionPolicy.INTEREST,
    )
    yield workflow.stream
    await js.delete_stream(workflow.stream)


@pytest.fixture
def kre_py(
    request: pytest.FixtureRequest, tmp_path: Path, nats_server: NatsServer, workflow: Workflow
) -> Iterator[Callable[..., KrePyNode]]:
    """Start kre-py nodes; print their logs when the test failed; stop them by PID."""
    nodes: list[KrePyNode] = []

    def start(node: str, output: str, handler: str, last: bool = False) -> KrePyNode:
        env = workflow.kre_py_env(nats_server.url, node, output, handler, last)
        nodes.append(KrePyNode(tmp_path, env).start())
        return nodes[-1]

    yield start
    report = getattr(request.node, "rep_call", None)
    for node in nodes:
        node.stop()
        if report is not None and report.failed:
            print(f"--- kre-py {node.name}\n" + "\n".join(node.log().splitlines()[-60:]))


def node_b_config(nats_server: NatsServer, workflow: Workflow) -> NodeConfig:
    return NodeConfig(
        nats_url=nats_server.url,
        stream=workflow.stream,
        base_path=HANDLERS,
        handler_path="node_b.py",
        node_name="nodeB",
        input_subject=workflow.subject("nodeB"),
        output_subject=workflow.subject("nodeC"),
        entrypoint_subject=workflow.entrypoint,
        workflow="Greet",
        version=VERSION,
    )


async def test_mixed_workflow_answers_every_request(
    js: Any,
    nats_server: NatsServer,
    workflow: Workflow,
    stream: str,
    make_node: Callable[[NodeConfig], LocalNode],
    kre_py: Callable[..., KrePyNode],
) -> None:
    entrypoint = await Entrypoint(js, workflow).start([workflow.entrypoint], ack=True)
    node_subjects = [workflow.subject(n) for n in ("nodeA", "nodeB", "nodeC")]
    observer = await Observer(js, stream).start(node_subjects, ack=False)
    node_b = make_node(node_b_config(nats_server, workflow))
    node_b.start()
    node_a = kre_py("nodeA", workflow.subject("nodeB"), "node_a.py")
    # KRE gives the last node the entrypoint subject as its output: kre-py publishes to
    # KRT_NATS_OUTPUT as it is, and its last-node rule reads KRT_IS_LAST_NODE.
    node_c = kre_py("nodeC", workflow.entrypoint, "node_c.py", last=True)
    await wait_kre_py_ready(js, stream, node_a)
    await wait_kre_py_ready(js, stream, node_c)

    normal = {name: await entrypoint.send(name) for name in NAMES}
    failing = await entrypoint.send("  fail-b ")
    exiting = await entrypoint.send("exit-b")
    large = await entrypoint.send(LARGE_NAME)
    sent = [*normal.values(), failing, exiting, large]
    through_c = [*normal.values(), large]
    replies = await entrypoint.wait_replies(len(sent), timeout=90)

    counts = Counter(reply.tracking_id for _, reply in entrypoint.replies)
    assert set(counts) == {r.tracking_id for r in sent}, node_b.logs()
    assert max(counts.values()) == 1, counts  # one reply per request, no more
    for name, request in normal.items():
        assert_greeted(replies[request.tracking_id], request, name)
    assert_greeted(replies[large.tracking_id], large, LARGE_NAME)

    # fail-b: node B's error reaches the entrypoint, and node C never runs for it.
    error = replies[failing.tracking_id]
    assert error.error.startswith("error in 'nodeB': "), error
    assert "refusing 'fail-b'" in error.error
    assert not error.HasField("payload")

    # exit-b: node B answers the entrypoint itself; node C never sees it.
    early = replies[exiting.tracking_id]
    assert not early.error
    assert greeting(early) == "Goodbye early, exit-b!"
    assert tracking_names(early) == ["entrypoint", "nodeA", "nodeB"]
    assert early.reply == exiting.reply

    # The 1.5 MB request went gzipped on every hop, the others plain.
    raw = {reply.tracking_id: data for data, reply in entrypoint.replies}
    assert raw[large.tracking_id][:2] == GZIP_MAGIC  # C -> entrypoint, by kre-py
    wanted = dict(zip(node_subjects, (len(sent), len(sent), len(through_c)), strict=True))
    assert await observer.wait_counts(wanted, 30) == wanted
    # entrypoint -> A, A (kre-py) -> B, B (sidecar) -> C
    assert [observer.gzipped(s, large.tracking_id) for s in node_subjects] == [[True]] * 3
    small = normal["ada"].tracking_id
    assert [observer.gzipped(s, small) for s in node_subjects] == [[False]] * 3
    await observer.close()

    assert_measured(node_a, node_c, sent, through_c)
    delivered = {node_a.durable: len(sent), "nodeB": len(sent), node_c.durable: len(through_c)}
    await assert_nothing_left(js, stream, delivered, node_subjects)
    await wait_settled(js, stream, entrypoint.durable)


def assert_greeted(reply: KreNatsMessage, request: KreNatsMessage, name: str) -> None:
    """Through all three nodes, greeting the normalized, upper-cased name."""
    assert not reply.error
    assert greeting(reply) == f"Hello, {normalized(name).upper()}!"
    assert tracking_names(reply) == ["entrypoint", "nodeA", "nodeB", "nodeC"]
    assert reply.tracking[0] == request.tracking[0]
    assert reply.reply == request.reply  # the request id, carried by every node
    node_b = reply.tracking[2]
    assert KRE_TIME.fullmatch(node_b.start) and KRE_TIME.fullmatch(node_b.end), node_b
    b_start, b_end, c_start = (
        datetime.fromisoformat(t) for t in (node_b.start, node_b.end, reply.tracking[3].start)
    )
    assert b_start <= b_end <= c_start


def assert_measured(
    node_a: KrePyNode,
    node_c: KrePyNode,
    sent: list[KreNatsMessage],
    through_c: list[KreNatsMessage],
) -> None:
    """Node C parsed node B's tracking times with kre-py's arithmetic, for every message."""
    ids = {r.tracking_id for r in through_c}
    points = {p["fields"]["tracking_id"]: p for p in node_c.points("node_elapsed_time")}
    assert set(points) == ids, node_c.log()[-3000:]
    for point in points.values():
        assert point["fields"]["node_from"] == "nodeB"
        assert 0 <= point["fields"]["waiting_ms"] < 10_000, point
        assert point["tags"] == {"workflow": "Greet", "version": VERSION, "node": "nodeC"}
    workflow_points = node_c.points("workflow_elapsed_time")
    assert {p["fields"]["tracking_id"] for p in workflow_points} == ids
    assert all(p["fields"]["elapsed_ms"] > 0 for p in workflow_points)
    node_a_points = node_a.points("node_elapsed_time")
    assert {p["fields"]["tracking_id"] for p in node_a_points} == {r.tracking_id for r in sent}
    assert all(p["fields"]["node_from"] == "entrypoint" for p in node_a_points)
    assert all(p["fields"]["waiting_ms"] >= 0 for p in node_a_points)
    for node in (node_a, node_c):
        assert "error executing handler" not in node.log()
        assert "nats: encountered error" not in node.log()


async def assert_nothing_left(
    js: JetStreamContext, stream: str, delivered: dict[str, int], node_subjects: list[str]
) -> None:
    """Every node's consumer settled, each input delivered once; no node message stored."""
    for durable, count in delivered.items():
        info = await wait_settled(js, stream, durable)
        assert info.num_redelivered == 0, info
        assert info.delivered.consumer_seq == count, info

    async def node_subjects_empty() -> bool:
        info = await js.stream_info(stream, subjects_filter=">")
        return not set(info.state.subjects or {}) & set(node_subjects)

    await eventually(node_subjects_empty, 10, "no message left on the node subjects")


async def test_kre_py_stand_in_loses_a_request_whose_tracking_time_has_a_z(
    js: Any,
    workflow: Workflow,
    stream: str,
    kre_py: Callable[..., KrePyNode],
) -> None:
    """The stand-in fails as kre-py did on a `Z`: so the test above would catch one.

    The same envelope with a naive time is answered; with a `Z`, kre-py's elapsed-time
    arithmetic raises after the ack, its second ack raises MsgAlreadyAckdError, and the
    entrypoint gets nothing at all.
    """
    entrypoint = await Entrypoint(js, workflow).start([workflow.entrypoint], ack=True)
    node_c = kre_py("nodeC", workflow.entrypoint, "node_c.py", last=True)
    await wait_kre_py_ready(js, stream, node_c)

    async def send_from_b(end: str) -> KreNatsMessage:
        now = datetime.utcnow().isoformat()
        envelope = KreNatsMessage(tracking_id=str(uuid.uuid4()))
        envelope.tracking.add(node_name="entrypoint", start=now, end=now)
        envelope.tracking.add(node_name="nodeB", start=now, end=end)
        envelope.payload.Pack(Request(name="ZED"))
        await js.publish(workflow.subject("nodeC"), envelope.SerializeToString(), stream=stream)
        return envelope

    naive = await send_from_b(datetime.utcnow().isoformat())
    replies = await entrypoint.wait_replies(1, timeout=30)
    assert greeting(replies[naive.tracking_id]) == "Hello, ZED!"

    await send_from_b(datetime.utcnow().isoformat() + "Z")
    await eventually(lambda: "MsgAlreadyAckdError" in node_c.log(), 30, "kre-py's second ack")
    assert "nats: encountered error" in node_c.log()
    assert "error executing handler" not in node_c.log()
    assert await entrypoint.fetch(timeout=1.0) == []
    info = await wait_settled(js, stream, node_c.durable)
    assert info.num_redelivered == 0 and info.delivered.consumer_seq == 2
