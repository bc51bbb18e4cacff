"""What is measured: the four cases of issue 5 and the messages each one sends.

Every input is a KRE envelope as the previous node would write it (`request_envelope`),
its payload a `BytesValue` of the case's size packed in `Any`. Inputs over KRE's 1 MiB
are gzipped, as KRE's previous node would do, so (d) exercises the compressed path both
ways: gunzip of the input and gzip of the output in the sidecar.
"""

from __future__ import annotations

import gzip
import os
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from enum import Enum

from google.protobuf.wrappers_pb2 import BytesValue

from deploy.local.client import request_envelope

KIB = 1024
MIB = 1024 * KIB
KRE_COMPRESS_ABOVE = MIB  # KRT_MAX_PAYLOAD_BYTES' default: bigger envelopes are gzipped
# Level 1: inputs are built before the clock starts, and any level reads back the same.
INPUT_GZIP_LEVEL = 1


class Mode(Enum):
    BACKLOG = "all at once"
    ONE_AT_A_TIME = "one at a time"


@dataclass(frozen=True)
class Case:
    """One row of the table (the split runner), plus its baseline row when `baseline`."""

    key: str
    title: str
    payload_bytes: int
    count: int
    mode: Mode
    latency_count: int = 0  # a one-at-a-time pass on the same node after the backlog
    baseline: bool = False
    # Also the loop that awaits each PubAck before the next publish: the kind of loop
    # behind issue 5's "about 3,500 msgs/s", shown for reference (no target uses it).
    each_ack_baseline: bool = False

    @property
    def label(self) -> str:
        return f"({self.key}) {self.title}"

    def scaled(self, count: int | None, latency_count: int | None = None) -> Case:
        return replace(
            self,
            count=self.count if count is None else count,
            latency_count=self.latency_count if latency_count is None else latency_count,
        )


FULL = (
    Case("a", "100 B, all at once", 100, 5000, Mode.BACKLOG, baseline=True, each_ack_baseline=True),
    Case("b", "100 B, one at a time", 100, 1000, Mode.ONE_AT_A_TIME),
    Case("c", "100 KB", 100 * KIB, 1000, Mode.BACKLOG, latency_count=200, baseline=True),
    Case("d", "2 MB, gzip path", 2 * MIB, 100, Mode.BACKLOG, latency_count=20),
)
QUICK = (
    Case("a", "100 B, all at once", 100, 500, Mode.BACKLOG, baseline=True, each_ack_baseline=True),
    Case("b", "100 B, one at a time", 100, 100, Mode.ONE_AT_A_TIME),
    Case("c", "100 KB", 100 * KIB, 100, Mode.BACKLOG, latency_count=20, baseline=True),
    Case("d", "2 MB, gzip path", 2 * MIB, 10, Mode.BACKLOG, latency_count=5),
)


class Workload:
    """`count` distinct input envelopes for one case, and what each reply must carry.

    The bytes are made on demand (100 MB of 100 KB inputs need not sit in memory);
    `expected` maps each tracking id to the CRC-32 of its payload, which the echo
    handler must give back unchanged.
    """

    def __init__(self, payload_bytes: int, count: int, seed: int = 5) -> None:
        self.payload_bytes = payload_bytes
        self.count = count
        self._fixed = None if payload_bytes <= KIB else _text_like(payload_bytes, seed)
        self._payloads: dict[str, bytes] = {}
        self.ids = [f"bench-{os.urandom(8).hex()}-{i}" for i in range(count)]
        self.expected: dict[str, int] = {}
        for tracking_id in self.ids:
            payload = self._fixed or os.urandom(payload_bytes)
            if self._fixed is None:
                self._payloads[tracking_id] = payload
            self.expected[tracking_id] = zlib.crc32(payload)

    def encode(self, tracking_id: str) -> bytes:
        payload = self._fixed or self._payloads[tracking_id]
        envelope = request_envelope(BytesValue(value=payload), tracking_id=tracking_id)
        data = envelope.SerializeToString()
        if len(data) > KRE_COMPRESS_ABOVE:
            data = gzip.compress(data, compresslevel=INPUT_GZIP_LEVEL)
        return data

    def messages(self, ids: list[str] | None = None) -> Iterator[tuple[str, bytes]]:
        for tracking_id in self.ids if ids is None else ids:
            yield tracking_id, self.encode(tracking_id)

    def wire_bytes(self) -> int:
        """Size of one input as published (gzipped when KRE would gzip it)."""
        return len(self.encode(self.ids[0])) if self.ids else 0


def _text_like(size: int, seed: int) -> bytes:
    """Words from a 1,024-word vocabulary: gzips to about a third, as text does.

    Random bytes would not compress, and a 2 MB envelope must gzip below NATS's 1 MB
    max_payload to travel at all.
    """
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(3, 9))) for _ in range(1024)]
    words: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(vocab)
        words.append(word)
        length += len(word) + 1
    return " ".join(words).encode()[:size]
