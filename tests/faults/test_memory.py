"""Case 9: a burst of small gzipped inputs that each hold 31 MiB, among good ones.

Each input is about 32 KB on the wire and legal (under KRT_MAX_MESSAGE_BYTES, 32 MiB
by default). The window charges each its decompressed size, as its gzip trailer
declares it, before decompressing: so they are decompressed one at a time, and the
sidecar's peak memory stays under the limit its Deployment gives it, with the default
settings. Every input, big or small, is answered once (the big ones with their echo,
gzipped) and none is dead-lettered.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from pathlib import Path

import pytest
import yaml
from google.protobuf.wrappers_pb2 import StringValue

from deploy.local.client import DeadLetters, Downstream, Upstream, request_envelope
from sidecar.settings import DEFAULT_MAX_INPUT_BYTES
from tests.faults.conftest import node_config
from tests.faults.harness import Row, texts

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

DEPLOYMENT = Path(__file__).parents[2] / "deploy" / "kubernetes" / "base" / "deployment.yaml"
MIB = 1024 * 1024
# Just under KRT_MAX_MESSAGE_BYTES's default, once in its envelope.
BIG = DEFAULT_MAX_INPUT_BYTES - MIB


def sidecar_memory_limit() -> int:
    """The sidecar container's memory limit in the Kustomize base, in bytes."""
    deployment = yaml.safe_load(DEPLOYMENT.read_text())
    containers = deployment["spec"]["template"]["spec"]["containers"]
    [sidecar] = [c for c in containers if c["name"] == "sidecar"]
    limit = sidecar["resources"]["limits"]["memory"]
    assert limit.endswith("Mi"), limit
    return int(limit[:-2]) * MIB


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def big_gzipped_envelope() -> tuple[str, bytes]:
    """A KRE envelope holding BIG bytes of text, gzipped: a few KB; its tracking id."""
    envelope = request_envelope(StringValue(value="x" * BIG))
    return envelope.tracking_id, gzip.compress(envelope.SerializeToString(), compresslevel=9)


async def test_9_gzip_burst_stays_under_the_sidecar_memory_limit(
    js, nats_server, stream_name, stream_for, make_node, fault_report
) -> None:
    config = node_config(nats_server.url, stream_name)  # the default settings
    await stream_for(config)
    node = make_node(config)
    await asyncio.to_thread(node.start)
    replies = await Downstream(
        js, config.stream, config.output_subject, config.entrypoint_subject
    ).start()
    letters = await DeadLetters(js, config.stream, config.dlq_subject).start()
    good = texts(40)
    bigs = [await asyncio.to_thread(big_gzipped_envelope) for _ in range(4)]
    assert all(len(big) < 100 * 1024 for _, big in bigs)

    started = time.perf_counter()
    upstream = Upstream(js, config.input_subject)
    await upstream.send_all(good[:20])
    for tracking_id, big in bigs:
        await upstream.send(big, tracking_id=tracking_id)
    await upstream.send_all(good[20:])
    await replies.wait_for(44, timeout=180)
    elapsed = time.perf_counter() - started
    await letters.poll(timeout=0.5)

    by_id = replies.by_tracking_id()
    assert all(not by_id[r.tracking_id].error for r in good), "a good input failed"
    assert replies.duplicates() == 0
    # The big ones are answered too: their echo, gzipped.
    assert all(not by_id[tracking_id].error for tracking_id, _ in bigs)
    assert letters.received == []
    assert node.sidecar is not None
    peak, limit = peak_rss(node.sidecar.pid), sidecar_memory_limit()
    print(f"sidecar peak RSS {peak / MIB:.0f} MiB (limit {limit / MIB:.0f} MiB)")
    assert peak < limit, f"sidecar peak {peak / MIB:.0f} MiB, over its {limit / MIB:.0f} MiB"
    fault_report.append(
        Row(
            "9 4 x 31 MiB gzip bursts among 40",
            44,
            len(replies.received),
            0,
            0,
            None,
            None,
            elapsed,
        )
    )
