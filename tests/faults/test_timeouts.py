"""Handlers that hang or ask for retries, end to end (real processes, real nats-server).

KRT_HANDLER_TIMEOUT: hung async handlers, a sync handler holding the only thread, a
frozen handler host (the sidecar's safety net); and RetryableError with its backoff
and dead letter. Not among the eight load cases (fewer requests): each checks one
ending, and that every request is still answered exactly once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter

import pytest
from google.protobuf.wrappers_pb2 import StringValue

from deploy.local.client import DeadLetters, Downstream
from tests.faults.conftest import node_config
from tests.faults.harness import Load, delivered, texts

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]


def text(envelope) -> str:  # type: ignore[no-untyped-def]
    value = StringValue()
    envelope.payload.Unpack(value)
    return value.value


async def answered_once(load: Load, replies: Downstream) -> dict[str, object]:
    counts = Counter(m.tracking_id for m in replies.received)
    assert set(counts) == set(load.requests) and max(counts.values()) == 1
    return {m.tracking_id: m for m in replies.received}


async def test_hung_async_handlers_time_out_and_the_host_keeps_serving(
    js, nats_server, stream_name, stream_for, make_node
) -> None:
    config = node_config(nats_server.url, stream_name, KRT_HANDLER_TIMEOUT="1")
    await stream_for(config)
    node = make_node(config)
    await asyncio.to_thread(node.start)
    load = await Load(js, config, "timeouts", []).start()
    good = texts(200)
    hung = texts(5, prefix="hang:")

    await load.send([*good[:100], *hung, *good[100:]])
    replies = await Downstream(
        js, config.stream, config.output_subject, config.entrypoint_subject
    ).start()
    await replies.wait_for(205, timeout=30)
    await load.settled(config.node_name, 30)

    by_id = await answered_once(load, replies)
    for request in hung:
        error = by_id[request.tracking_id].error  # type: ignore[attr-defined]
        assert error == "error in 'faulty': handler timed out after 1s"
    for request in good:
        assert text(by_id[request.tracking_id]) == f"echo {text(request)}"
    assert node.host is not None and node.host.poll() is None


async def test_a_sync_handler_holding_the_only_thread_delays_but_loses_nothing(
    js, nats_server, stream_name, stream_for, make_node
) -> None:
    config = node_config(
        nats_server.url,
        stream_name,
        handler="echo_sync.py",
        KRT_HANDLER_TIMEOUT="1",
        KRT_HANDLER_THREADS="1",
        KRT_NAK_DELAY="0.2",
    )
    await stream_for(config)
    node = make_node(config)
    await asyncio.to_thread(node.start)
    load = await Load(js, config, "timeouts", []).start()
    [stuck] = texts(1, prefix="hang:3:")  # holds the thread 3 s: the timeout is 1 s
    good = texts(20)

    await load.send([stuck])
    await load.send(good)
    replies = await Downstream(
        js, config.stream, config.output_subject, config.entrypoint_subject
    ).start()
    await replies.wait_for(21, timeout=40)
    await load.settled(config.node_name, 30)

    by_id = await answered_once(load, replies)
    assert by_id[stuck.tracking_id].error == "error in 'faulty': handler timed out after 1s"  # type: ignore[attr-defined]
    assert all(text(by_id[r.tracking_id]) == f"echo {text(r)}" for r in good)
    host_log = (node.run_dir / "handler-host.log").read_text()
    assert "every handler thread (KRT_HANDLER_THREADS=1) is held" in host_log
    assert "its thread is free again" in host_log


async def test_a_frozen_handler_host_trips_the_sidecar_safety_net(
    js, nats_server, stream_name, stream_for, make_node
) -> None:
    # KRT_HANDLER_TIMEOUT=1: the sidecar waits 2 x 1 s + 5 s for a Result, then naks.
    config = node_config(nats_server.url, stream_name, KRT_HANDLER_TIMEOUT="1", FAULTS_DELAY="0.05")
    await stream_for(config)
    node = make_node(config)
    await asyncio.to_thread(node.start)
    load = await Load(js, config, "timeouts", []).start()
    sidecar_log = node.run_dir / "sidecar.log"

    await load.send(texts(300))
    await load.until_answered(50)
    assert node.host is not None
    os.kill(node.host.pid, signal.SIGSTOP)  # alive, socket open, answering nothing
    try:
        deadline = time.monotonic() + 20
        while "does not answer" not in sidecar_log.read_text():
            assert time.monotonic() < deadline, "the sidecar never gave up waiting"
            await asyncio.sleep(0.1)
    finally:
        os.kill(node.host.pid, signal.SIGCONT)

    replies = await Downstream(
        js, config.stream, config.output_subject, config.entrypoint_subject
    ).start()
    await replies.wait_for(300, timeout=60)
    await load.settled(config.node_name, 60)
    await answered_once(load, replies)
    assert "no result from the handler host within 7s" in sidecar_log.read_text()


async def test_retryable_error_is_retried_with_backoff_then_dead_lettered(
    js, nats_server, stream_name, stream_for, make_node
) -> None:
    config = node_config(nats_server.url, stream_name, KRT_NAK_DELAY="0.1", KRT_MAX_DELIVER="4")
    await stream_for(config)
    node = make_node(config)
    await asyncio.to_thread(node.start)
    load = await Load(js, config, "retry", []).start()
    [recovers] = texts(1, prefix="retry:2:")  # fails twice, then answers
    [gives_up] = texts(1, prefix="retry:9:")  # fails every one of the 4 attempts

    await load.send([recovers, gives_up])
    replies = await Downstream(
        js, config.stream, config.output_subject, config.entrypoint_subject
    ).start()
    await replies.wait_for(2, timeout=30)
    letters = await DeadLetters(js, config.stream, config.dlq_subject).start()
    [letter] = await letters.wait_for(1, timeout=10)
    info = await load.settled(config.node_name, 30)

    by_id = await answered_once(load, replies)
    assert text(by_id[recovers.tracking_id]) == f"echo {text(recovers)}"
    assert by_id[gives_up.tracking_id].error == (  # type: ignore[attr-defined]
        "error in 'faulty': gave up after 4 attempts: retryable error: not yet (4)"
    )
    assert letter.reason == "gave up after 4 attempts: retryable error: not yet (4)"
    assert letter.data == gives_up.SerializeToString()
    assert delivered(info) == 3 + 4
