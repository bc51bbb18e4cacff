"""Processes dying mid-load: 2,000 requests each, every one answered exactly once.

Cases 1, 2, 4 and 5 of the fault-injection suite. Each publishes every request first,
waits until some replies are in, injects the fault, brings things back, and lets
`Load.finish` check the replies, the dead letters and the consumer.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from tests.faults.conftest import node_config
from tests.faults.harness import Load, delivered, texts

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

COUNT = 2000
# Slow enough that a load of 2,000 lasts several seconds on a small CI machine.
LOAD = {"FAULTS_DELAY": "0.05", "KRT_MAX_IN_FLIGHT": "32"}


def killed(proc) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL a process this test started, by its PID, and reap it."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


async def test_1_sigkill_handler_host_mid_load_then_restart(
    js, nats_server, stream_name, stream_for, make_node, fault_report
) -> None:
    config = node_config(nats_server.url, stream_name, **LOAD)
    await stream_for(config)
    node = make_node(config)
    await asyncio.to_thread(node.start)
    load = await Load(js, config, "1 SIGKILL handler host, restart", fault_report).start()

    await load.send(texts(COUNT))
    await load.until_answered(COUNT // 5)
    load.fault()
    killed(node.host)
    node.start_host()
    await asyncio.to_thread(node.wait_ready)

    await load.finish()
    assert node.sidecar is not None and node.sidecar.poll() is None  # it rode it out


async def test_2_sigkill_sidecar_mid_load_then_restart(
    js, nats_server, stream_name, stream_for, make_node, fault_report
) -> None:
    # Its un-acked messages come back after KRT_ACK_WAIT: short here, 30 s by default.
    config = node_config(nats_server.url, stream_name, KRT_ACK_WAIT="2", **LOAD)
    await stream_for(config)
    node = make_node(config)
    await asyncio.to_thread(node.start)
    load = await Load(js, config, "2 SIGKILL sidecar, restart", fault_report).start()

    await load.send(texts(COUNT))
    await load.until_answered(COUNT // 5)
    load.fault()
    killed(node.sidecar)
    node.start_sidecar()
    await asyncio.to_thread(node.wait_ready)

    _, info = await load.finish()
    assert delivered(info) > COUNT  # some were delivered twice: the fault bit


async def test_4_sigterm_both_mid_load_rolling_restart(
    js, nats_server, stream_name, stream_for, make_node, fault_report
) -> None:
    config = node_config(nats_server.url, stream_name, KRT_SHUTDOWN_GRACE="15", **LOAD)
    await stream_for(config)
    node = make_node(config)
    await asyncio.to_thread(node.start)
    load = await Load(js, config, "4 SIGTERM both, start again", fault_report).start()

    await load.send(texts(COUNT))
    await load.until_answered(COUNT // 5)
    load.fault()
    # Kubernetes signals every container of the pod at once, once.
    assert node.sidecar is not None and node.host is not None
    sidecar, host = node.sidecar, node.host
    node.send_signal("sidecar", signal.SIGTERM)
    node.send_signal("host", signal.SIGTERM)
    codes = await asyncio.to_thread(lambda: (sidecar.wait(30), host.wait(30)))
    assert codes == (0, 0), node.logs()
    answered_while_down = await load.answered()
    await asyncio.to_thread(node.start)

    await load.finish()
    assert answered_while_down < COUNT


async def test_4b_sigterm_handler_host_alone_mid_load_then_restart(
    js, nats_server, stream_name, stream_for, make_node, fault_report
) -> None:
    config = node_config(nats_server.url, stream_name, **LOAD)
    await stream_for(config)
    node = make_node(config)
    await asyncio.to_thread(node.start)
    load = await Load(js, config, "4b SIGTERM handler host, restart", fault_report).start()

    await load.send(texts(COUNT))
    await load.until_answered(COUNT // 5)
    load.fault()
    host_code = await asyncio.to_thread(node.stop_host, 30)  # finishes its in-flight calls
    assert host_code == 0, node.logs()
    node.start_host()
    await asyncio.to_thread(node.wait_ready)

    await load.finish()
    log = (node.run_dir / "handler-host.log").read_text()
    assert "grace period over with calls in progress" not in log


async def test_5_two_pairs_on_one_consumer_one_pair_killed(
    js, nats_server, stream_name, stream_for, make_node, fault_report
) -> None:
    config = node_config(nats_server.url, stream_name, KRT_ACK_WAIT="2", **LOAD)
    await stream_for(config)
    doomed, survivor = make_node(config), make_node(config)
    await asyncio.gather(asyncio.to_thread(doomed.start), asyncio.to_thread(survivor.start))
    load = await Load(js, config, "5 two pairs, SIGKILL one pair", fault_report).start()

    await load.send(texts(COUNT))
    await load.until_answered(COUNT // 5)
    load.fault()
    killed(doomed.sidecar)
    killed(doomed.host)

    _, info = await load.finish()
    assert survivor.sidecar is not None and survivor.sidecar.poll() is None
    assert delivered(info) > COUNT  # the killed pair's messages came back
