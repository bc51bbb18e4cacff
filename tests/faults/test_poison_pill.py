"""One bad message among good ones: only it is charged, every good one answered once.

20 good requests, one trigger, 20 good, published at once, as in the hardening issue.
The trigger ends the handler host (os._exit), blocks its event loop past the result
timeout, or calls sys.exit() / raises KeyboardInterrupt. Each good message must be
answered exactly once and never dead-lettered. A trigger that takes the host down is
found by trying the suspects alone (`sidecar.isolation`) and dead-lettered alone; one
that only raises gets its error envelope and the host lives on. A small KRT_MAX_DELIVER
and KRT_NAK_DELAY keep it quick without weakening the point: good neighbours charged
for the trigger's failures would be dead-lettered after two rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from google.protobuf.wrappers_pb2 import StringValue
from nats.js import JetStreamContext

from deploy.local.client import DeadLetters, Downstream, request_envelope
from deploy.local.node import LocalNode, NodeConfig
from tests.faults.conftest import node_config
from tests.faults.harness import Row, texts
from tests.waiting import eventually

pytestmark = [pytest.mark.faults, pytest.mark.timeout(150)]

QUICK = {"KRT_NAK_DELAY": "0.2", "KRT_MAX_DELIVER": "2", "FAULTS_DELAY": "0.05"}
CRASHED = "crashed or blocked the handler host"


class Outcome:
    def __init__(self, replies: Downstream, letters: DeadLetters) -> None:
        self.replies = replies
        self.letters = letters

    def of(self, tracking_id: str) -> list[str]:
        """The reply texts (or error texts) for one request."""
        out = []
        for reply in self.replies.received:
            if reply.tracking_id == tracking_id:
                if reply.error:
                    out.append(reply.error)
                else:
                    value = StringValue()
                    reply.payload.Unpack(value)
                    out.append(value.value)
        return out


@contextlib.asynccontextmanager
async def restarted_when_it_dies(node: LocalNode) -> AsyncIterator[list[int]]:
    """Start the handler host again whenever it exits, as Kubernetes would; the exit codes."""
    codes: list[int] = []

    async def watch() -> None:
        while True:
            assert node.host is not None
            code = node.host.poll()
            if code is not None:
                codes.append(code)
                node.start_host()
            await asyncio.sleep(0.05)

    task = asyncio.create_task(watch())
    try:
        yield codes
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def run_case(
    js: JetStreamContext,
    config: NodeConfig,
    node: LocalNode,
    case: str,
    report: list[Row],
    trigger_dead_lettered: bool,
) -> tuple[Outcome, dict[str, str], str]:
    """Publish 20 good, the trigger, 20 good; wait for 41 replies and a settled consumer."""
    good = texts(20, "a") + texts(20, "b")
    trigger = request_envelope(StringValue(value="poison"))
    started = time.time()
    for message in [*good[:20], trigger, *good[20:]]:
        await js.publish(config.input_subject, message.SerializeToString())
    replies = await Downstream(
        js, config.stream, config.output_subject, config.entrypoint_subject
    ).start()
    await replies.wait_for(41, timeout=100)

    async def settled() -> bool:
        info = await js.consumer_info(config.stream, config.node_name)
        return info.num_pending == 0 and info.num_ack_pending == 0

    await eventually(settled, 60, "consumer settled")
    letters = await DeadLetters(js, config.stream, config.dlq_subject).start()
    if trigger_dead_lettered:
        await letters.wait_for(1, 30)
    await replies.poll()  # anything late would be a duplicate
    await letters.poll()
    counts = Counter(reply.tracking_id for reply in replies.received)
    stored = sorted(replies.stored_at)
    report.append(
        Row(
            case=case,
            sent=41,
            answered=sum(1 for message in [*good, trigger] if counts[message.tracking_id]),
            duplicates=sum(n - 1 for n in counts.values()),
            dead_letters=len(letters.received),
            recovery=None,
            pause=None,
            elapsed=(stored[-1] if stored else time.time()) - started,
        )
    )
    outcome = Outcome(replies, letters)
    for message in good:
        request = StringValue()
        message.payload.Unpack(request)
        assert outcome.of(message.tracking_id) == [f"echo {request.value}"], node.logs()
    assert len(replies.received) == 41, "exactly one reply each, the trigger's included"
    await replies.stop()
    await letters.stop()
    return outcome, {}, trigger.tracking_id


def assert_only_trigger_dead_lettered(outcome: Outcome, tracking_id: str) -> None:
    assert len(outcome.letters.received) == 1
    (letter,) = outcome.letters.received
    assert StringValue(value="poison").SerializeToString() in letter.data
    assert CRASHED in letter.reason, letter.reason
    (error,) = outcome.of(tracking_id)
    assert CRASHED in error


async def test_10_sync_handler_os_exit_among_good_messages(
    js, nats_server, stream_name, stream_for, make_node, fault_report
) -> None:
    config = node_config(nats_server.url, stream_name, "poison_sync.py", **QUICK)
    await stream_for(config)
    node = make_node(config)
    await asyncio.to_thread(node.start)
    async with restarted_when_it_dies(node) as exits:
        outcome, _, trigger = await run_case(
            js, config, node, "10 os._exit among 40 good", fault_report, True
        )
    assert_only_trigger_dead_lettered(outcome, trigger)
    # Once beside the others, then alone at each of the KRT_MAX_DELIVER=2 attempts.
    assert exits == [1, 1, 1], node.logs()


async def test_11_async_handler_blocks_the_loop_among_good_messages(
    js, nats_server, stream_name, stream_for, make_node, fault_report
) -> None:
    # The sidecar waits 2 * 2 + 5 = 9 s for a Result: less than the 10 s block.
    config = node_config(
        nats_server.url,
        stream_name,
        "poison_async.py",
        KRT_HANDLER_TIMEOUT="2",
        FAULTS_POISON="block",
        FAULTS_BLOCK="10",
        **QUICK,
    )
    await stream_for(config)
    node = make_node(config)
    await asyncio.to_thread(node.start)
    outcome, _, trigger = await run_case(
        js, config, node, "11 async handler blocks the loop", fault_report, True
    )
    assert_only_trigger_dead_lettered(outcome, trigger)
    assert node.host is not None and node.host.poll() is None
    log = (node.run_dir / "handler-host.log").read_text()
    assert "the event loop has not turned" in log
    assert f"tracking id {trigger}" in log


@pytest.mark.parametrize(
    ("mode", "says"),
    [("sysexit", "the handler called sys.exit(3)"), ("interrupt", "raised KeyboardInterrupt")],
)
async def test_12_async_handler_raises_a_base_exception_among_good_messages(
    mode, says, js, nats_server, stream_name, stream_for, make_node, fault_report
) -> None:
    config = node_config(
        nats_server.url,
        stream_name,
        "poison_async.py",
        KRT_HANDLER_TIMEOUT="2",
        FAULTS_POISON=mode,
        **QUICK,
    )
    await stream_for(config)
    node = make_node(config)
    await asyncio.to_thread(node.start)
    host = node.host
    outcome, _, trigger = await run_case(
        js, config, node, f"12 async {mode} among 40 good", fault_report, False
    )
    assert node.host is host and host is not None and host.poll() is None, node.logs()
    (error,) = outcome.of(trigger)
    assert says in error
    assert not outcome.letters.received
    log = (node.run_dir / "handler-host.log").read_text()
    assert says in log and f"tracking_id={trigger}" in log
