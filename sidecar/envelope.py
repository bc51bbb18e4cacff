"""The KRE wire envelope: decode inputs, build outputs, compress as KRE does.

Pure functions, no I/O. Other KRE nodes read and write these bytes, so the rules
here are KRE's: gzip (magic `\\x1f\\x8b`) above 1 MiB, tracking carried over with
one entry added per node, errors as `error in '<node>': <message>`.
"""

from __future__ import annotations

import gzip
import zlib
from datetime import UTC, datetime

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from protos.kre_nats_msg_pb2 import KreNatsMessage
from sidecar.errors import BadInputError, PayloadTooLargeError

GZIP_MAGIC = b"\x1f\x8b"
# A gzip member's header (10 bytes) and trailer (CRC32, ISIZE: 8 bytes).
_GZIP_MIN_BYTES = 18
_PROBE_BYTES = 64 * 1024
# Speed over ratio: level 1 is much faster than gzip's default and a little larger, and any
# level reads back the same (docs/performance.md, "gzip and gunzip of big messages"). Only
# an output that level 1 leaves over the limit pays for the best level, a last try.
_COMPRESS_LEVEL = 1
_RETRY_LEVEL = 9


def is_compressed(data: bytes) -> bool:
    """True when the bytes start with the gzip magic number, KRE's only marker."""
    return data[:2] == GZIP_MAGIC


def declared_size(data: bytes) -> int | None:
    """What gzipped `data` says it comes to: its trailer's ISIZE; None when not gzip.

    ISIZE is the size of the last gzip member, modulo 2**32: exact for the one member
    that KRE's runners (and gzip.compress) write. It lets the decompressed size be
    charged to the in-flight window before a byte is decompressed; `decode` holds the
    data to it.
    """
    if not is_compressed(data) or len(data) < _GZIP_MIN_BYTES:
        return None
    return int.from_bytes(data[-4:], "little")


def gunzip(data: bytes, max_bytes: int, too_large: str = "") -> bytes:
    """Decompress gzip data, refusing to produce more than max_bytes (`too_large` says why).

    Streams through zlib with `max_length`, so a small gzip bomb stops at the cap
    instead of filling memory. Concatenated gzip members are read one after another,
    within the cap (which `decode` sets to what the last member's trailer declares).
    """
    out = bytearray()
    rest = data
    while rest:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            out += inflater.decompress(rest, max_bytes - len(out) + 1)
        except zlib.error as exc:
            raise BadInputError(f"bad gzip data: {exc}") from exc
        if len(out) > max_bytes:
            raise BadInputError(
                too_large or f"decompressed size is over the {max_bytes} byte limit"
            )
        if not inflater.eof:
            raise BadInputError("truncated gzip data")
        rest = inflater.unused_data
        if rest and not is_compressed(rest):
            raise BadInputError("unexpected bytes after the gzip data")
    return bytes(out)


def decode_input(data: bytes, max_bytes: int) -> KreNatsMessage:
    """Parse an input message (gzipped or not) into a KreNatsMessage or raise BadInputError."""
    return decode(data, max_bytes)[0]


def decode(data: bytes, max_bytes: int) -> tuple[KreNatsMessage, bytes]:
    """`decode_input`, and the envelope's plain bytes: `data` itself, or gunzipped."""
    if not data:
        raise BadInputError("empty message")
    if is_compressed(data):
        declared = declared_size(data)
        if declared is None:
            raise BadInputError("truncated gzip data")
        if declared > max_bytes:
            # Garbage after the magic also "declares" a huge size: a bounded look at the
            # start of the data tells bad gzip from an honest but oversized message.
            too_large = (
                f"decompressed size is over the {max_bytes} byte limit "
                f"(its gzip trailer declares {declared} bytes)"
            )
            gunzip(data, _PROBE_BYTES, too_large)  # bad gzip raises its own reason
            raise BadInputError(too_large)
        # Held to what the trailer declares: that is what the window was charged.
        lie = f"gzip data inflates past the {declared} bytes its trailer declares"
        data = gunzip(data, declared, lie)
        if not data:
            raise BadInputError("empty message once decompressed")
    elif len(data) > max_bytes:
        raise BadInputError(f"message size {len(data)} is over the {max_bytes} byte limit")
    message = KreNatsMessage()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise BadInputError(f"not a KreNatsMessage protobuf: {exc}") from exc
    return message, data


def rfc3339(moment: datetime) -> str:
    """UTC, microseconds and a `Z`: 2024-05-01T12:00:00.000123Z. Naive means UTC.

    For the sidecar's own stamps (dead-letter headers). Tracking entries, which other
    KRE runners parse, use `tracking_time`.
    """
    return _utc_fields(moment) + "Z"


def tracking_time(moment: datetime) -> str:
    """A tracking time as KRE's runners write it: naive UTC, six fraction digits.

    2022-07-18T10:00:00.000000: what kre-py writes (`utcnow().isoformat()`) and parses
    (`fromisoformat`, then subtracted from a naive `utcnow()`), and the layout kre-go
    parses (2006-01-02T15:04:05.000000). A `Z` or an offset breaks both of them.
    """
    return _utc_fields(moment)


def _utc_fields(moment: datetime) -> str:
    # Formatted from the fields rather than with astimezone + strftime: it runs twice per
    # message, and %-formatting is the fastest way here.
    if moment.tzinfo is not None and moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%06d" % (  # noqa: UP031 (speed, above)
        moment.year,
        moment.month,
        moment.day,
        moment.hour,
        moment.minute,
        moment.second,
        moment.microsecond,
    )


def build_output(
    request: KreNatsMessage,
    node_name: str,
    payload: any_pb2.Any,
    start: datetime,
    end: datetime,
) -> KreNatsMessage:
    """The envelope for the next node, as KRE builds it.

    tracking_id, reply and replied are carried over; the previous tracking entries
    are kept and one is added for this node. Fields this version does not know (a newer
    envelope's) are carried over too; an error and an early exit are not. The request is
    copied whole, payload included: the sidecar clears its payload first
    (`MessageProcessor._process`).
    """
    output = KreNatsMessage()
    output.CopyFrom(request)  # one copy: cheaper than copying the fields one by one
    if output.error:
        output.ClearField("error")
    if output.early_exit:  # KRE's runners build each output afresh: the flag is not passed on
        output.ClearField("early_exit")
    output.tracking.add(node_name=node_name, start=tracking_time(start), end=tracking_time(end))
    output.payload.CopyFrom(payload)
    return output


def build_early_reply(request: KreNatsMessage, payload: any_pb2.Any) -> KreNatsMessage:
    """The envelope for an early reply to the entrypoint, marked as replied."""
    reply = KreNatsMessage(
        tracking_id=request.tracking_id,
        reply=request.reply,
        replied=True,
    )
    reply.tracking.extend(request.tracking)
    reply.payload.CopyFrom(payload)
    return reply


def build_error(
    request: KreNatsMessage | None,
    tracking_id: str,
    node_name: str,
    message: str,
) -> KreNatsMessage:
    """KRE's error envelope: `error in '<node>': <message>`, tracking_id kept.

    With a decoded request its reply subject and tracking are carried over too, so
    the entrypoint can match the error to the call that is waiting for it.
    """
    error = KreNatsMessage(tracking_id=tracking_id, error=f"error in '{node_name}': {message}")
    if request is not None:
        error.reply = request.reply
        error.replied = request.replied
        error.tracking.extend(request.tracking)
    return error


def encode(message: KreNatsMessage, max_payload_bytes: int, limit: int | None = None) -> bytes:
    """Serialize an envelope; gzip it when over max_payload_bytes, as KRE does.

    `limit` (default: max_payload_bytes) is the largest result allowed, gzipped or not.
    Gzip level 1 first; over `limit`, level 9; PayloadTooLargeError when still over it.
    """
    limit = max_payload_bytes if limit is None else limit
    data = message.SerializeToString()
    if len(data) <= max_payload_bytes and len(data) <= limit:
        return data
    compressed = gzip.compress(data, compresslevel=_COMPRESS_LEVEL)
    if len(compressed) > limit:
        compressed = gzip.compress(data, compresslevel=_RETRY_LEVEL)
    if len(compressed) > limit:
        raise PayloadTooLargeError(len(compressed), limit, len(data))
    return compressed
