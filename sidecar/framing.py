"""DeliveryBatch bytes built from serialized Deliveries, nothing parsed or encoded twice.

A Delivery is serialized once, where the sidecar calls the host, and the envelope that
came from NATS is appended to it as its `message` field, as the bytes it arrived in. A
DeliveryBatch is those Deliveries framed as its repeated `deliveries` field. Protobuf's
wire format allows both: a length-delimited field is its tag, its length as a varint,
then its bytes, and a message is the concatenation of its fields, in any order. The tags
are computed from the generated descriptors, so a renumbered field changes them too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import NamedTuple

from google.protobuf.descriptor import FieldDescriptor

from protos import runner_pb2
from protos.contract import BATCH_BYTES

_LENGTH_DELIMITED = 2  # the wire type of message, string and bytes fields


class Request(NamedTuple):
    """One serialized Delivery, in parts joined once, where a batch is written."""

    size: int
    parts: tuple[bytes, ...]


def varint(value: int) -> bytes:
    """A non-negative integer in protobuf's base-128 varint encoding."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field_tag(field: FieldDescriptor) -> bytes:
    """The tag that precedes a value of this message field on the wire."""
    if field.type != FieldDescriptor.TYPE_MESSAGE:
        raise TypeError(f"{field.full_name} is not a message field")
    return varint(field.number << 3 | _LENGTH_DELIMITED)


DELIVERIES_TAG = field_tag(runner_pb2.DeliveryBatch.DESCRIPTOR.fields_by_name["deliveries"])
MESSAGE_TAG = field_tag(runner_pb2.Delivery.DESCRIPTOR.fields_by_name["message"])


def request(delivery: runner_pb2.Delivery, message: bytes | None = None) -> Request:
    """A Delivery, serialized; `message`: a serialized KreNatsMessage to send as its
    `message` field (`delivery.message` itself then unset)."""
    head = delivery.SerializeToString()
    if message is None:
        return Request(len(head), (head,))
    parts = (head, MESSAGE_TAG, varint(len(message)), message)
    return Request(sum(map(len, parts)), parts)


async def batches(
    requests: asyncio.Queue[Request | None], cap: int = BATCH_BYTES
) -> AsyncIterator[bytes]:
    """Every Delivery queued so far, as one DeliveryBatch, until None is queued.

    A batch stops before it would pass `cap` bytes, framing included; one Delivery alone
    may be bigger (the caller checked it against the gRPC limit). Whatever is queued
    while a batch is being sent goes in the next one: a busy stream sends few, large
    messages, and a quiet one sends each Delivery at once, alone.
    """
    held: list[Request | None] = []  # what did not fit in the last batch (or the end)
    while True:
        first = held.pop() if held else await requests.get()
        if first is None:
            return
        prefix = _framing(first)
        parts = [prefix, *first.parts]
        size = len(prefix) + first.size
        while not requests.empty():
            more = requests.get_nowait()
            if more is None:  # the end, once this batch is out
                held.append(None)
                break
            prefix = _framing(more)
            if size + len(prefix) + more.size > cap:  # the next batch's first
                held.append(more)
                break
            parts += (prefix, *more.parts)
            size += len(prefix) + more.size
        yield b"".join(parts)


def _framing(request: Request) -> bytes:
    """What precedes a Delivery in a DeliveryBatch: the field's tag and the length."""
    return DELIVERIES_TAG + varint(request.size)
