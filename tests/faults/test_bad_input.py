"""Case 6: every kind of bad input, interleaved with 2,000 good requests.

Each poison input gets exactly one error envelope and one dead letter (its original
bytes), is terminated, and the consumer never stops: the good requests around it are
all answered exactly once.
"""

from __future__ import annotations

import asyncio
import gzip

import pytest
from google.protobuf.wrappers_pb2 import StringValue

from deploy.local.client import request_envelope
from protos.kre_nats_msg_pb2 import KreNatsMessage
from tests.faults.conftest import node_config
from tests.faults.harness import Bad, Load, delivered, texts

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

COUNT = 2000
EVERY = 15  # one poison input after every 15 good ones
GRPC_LIMIT = 256 * 1024
MAX_MESSAGE = 1024 * 1024


# What the sidecar says about each kind (junk and truncated protobuf share the first).
REASONS = (
    "not a KreNatsMessage protobuf",
    "bad gzip data",
    f"decompressed size is over the {MAX_MESSAGE} byte limit",
    "empty message",
    f"bytes for the handler host, over the {GRPC_LIMIT} byte gRPC limit",
)


def poison_kinds() -> list[Bad]:
    valid = request_envelope(StringValue(value="x" * 300)).SerializeToString()
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)  # 64 MiB from ~64 KiB
    too_big = request_envelope(StringValue(value="y" * (GRPC_LIMIT + 1024)))
    return [
        Bad(b"\xff\xfe this is not protobuf"),
        Bad(valid[: len(valid) // 2]),  # truncated protobuf
        Bad(b"\x1f\x8b\x08\x00" + b"not deflate data" * 4),  # the gzip magic, then junk
        Bad(bomb),  # decompressed size capped by KRT_MAX_MESSAGE_BYTES
        Bad(b""),  # empty
        Bad(too_big.SerializeToString(), too_big.tracking_id),  # over the gRPC limit
    ]


def interleaved(good: list[KreNatsMessage]) -> list[KreNatsMessage | Bad]:
    kinds = poison_kinds()
    items: list[KreNatsMessage | Bad] = []
    for i, request in enumerate(good):
        items.append(request)
        if i % EVERY == EVERY - 1:
            bad = kinds[(i // EVERY) % len(kinds)]
            if bad.tracking_id:  # the one with a tracking id: a fresh id each time
                fresh = request_envelope(StringValue(value="y" * (GRPC_LIMIT + 1024)))
                bad = Bad(fresh.SerializeToString(), fresh.tracking_id)
            items.append(bad)
    return items


async def test_6_bad_inputs_interleaved_with_good_traffic(
    js, nats_server, stream_name, stream_for, make_node, fault_report
) -> None:
    config = node_config(
        nats_server.url,
        stream_name,
        KRT_GRPC_MAX_MESSAGE_BYTES=str(GRPC_LIMIT),  # read by both processes
        KRT_MAX_MESSAGE_BYTES=str(MAX_MESSAGE),
        KRT_LOG_LEVEL="ERROR",
    )
    await stream_for(config)
    node = make_node(config)
    await asyncio.to_thread(node.start)
    load = await Load(js, config, "6 bad inputs among good ones", fault_report).start()

    await load.send(interleaved(texts(COUNT)), window=64)
    row, info = await load.finish()

    assert len(load.poison) == COUNT // EVERY and row.dead_letters == len(load.poison)
    assert delivered(info) == load.expected  # each delivered once: never retried
    log = (node.run_dir / "sidecar.log").read_text()
    dead_lines = [line for line in log.splitlines() if "dead-lettered" in line]
    assert len(dead_lines) == len(load.poison)  # one clear line each
    for reason in REASONS:
        assert any(reason in line for line in dead_lines), reason
    assert node.sidecar is not None and node.sidecar.poll() is None
