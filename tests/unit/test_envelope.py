"""The KRE envelope: tracking, compression, bad inputs, byte compatibility."""

from __future__ import annotations

import gzip
import os
import random
import re
import string
import zlib
from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf import any_pb2, wrappers_pb2

from protos.kre_nats_msg_pb2 import KreNatsMessage
from sidecar import envelope
from sidecar.errors import BadInputError, PayloadTooLargeError

KRE_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}$")
MIB = 1024 * 1024


def packed(text: str) -> any_pb2.Any:
    payload = any_pb2.Any()
    payload.Pack(wrappers_pb2.StringValue(value=text))
    return payload


def request() -> KreNatsMessage:
    msg = KreNatsMessage(tracking_id="track-1", reply="_INBOX.reply", replied=True)
    msg.tracking.add(node_name="entrypoint", start="2024-01-01T00:00:00.000000Z", end="e0")
    msg.tracking.add(node_name="node-a", start="s1", end="e1")
    msg.payload.CopyFrom(packed("input"))
    return msg


def test_output_carries_tracking_and_adds_this_node() -> None:
    start = datetime(2024, 5, 1, 12, 0, 0, 123, tzinfo=UTC)
    end = start + timedelta(milliseconds=5)

    out = envelope.build_output(request(), "node-b", packed("output"), start, end)

    assert [t.node_name for t in out.tracking] == ["entrypoint", "node-a", "node-b"]
    assert out.tracking[0].start == "2024-01-01T00:00:00.000000Z"  # as it came
    assert out.tracking[2].start == "2024-05-01T12:00:00.000123"
    assert out.tracking[2].end == "2024-05-01T12:00:00.005123"
    assert KRE_TIME.match(out.tracking[2].start)
    assert out.tracking_id == "track-1"
    assert out.reply == "_INBOX.reply"
    assert out.replied is True
    assert out.error == ""
    value = wrappers_pb2.StringValue()
    assert out.payload.Unpack(value) and value.value == "output"


def test_output_keeps_fields_this_version_does_not_know_and_drops_an_error() -> None:
    newer = request().SerializeToString() + b"\x48\x07"  # field 9, a varint: not ours
    parsed = KreNatsMessage.FromString(newer)
    parsed.error = "stale"
    now = datetime(2024, 5, 1, tzinfo=UTC)

    out = envelope.build_output(parsed, "node-b", packed("output"), now, now)

    assert b"\x48\x07" in out.SerializeToString()
    assert out.error == ""


def test_rfc3339_converts_to_utc_and_treats_naive_as_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert envelope.rfc3339(datetime(2024, 1, 1, 14, 0, tzinfo=plus_two)) == (
        "2024-01-01T12:00:00.000000Z"
    )
    assert envelope.rfc3339(datetime(2024, 1, 1, 12, 0)) == "2024-01-01T12:00:00.000000Z"


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (datetime(2024, 5, 1, 12, 0, 0, 123, tzinfo=UTC), "2024-05-01T12:00:00.000123Z"),
        (datetime(2024, 5, 1, 2, 3, 4, 5), "2024-05-01T02:03:04.000005Z"),  # naive: UTC
        (datetime(2024, 12, 31, 23, 59, 59, 999999), "2024-12-31T23:59:59.999999Z"),
        (datetime(2024, 5, 1, 12, 0, 0, 120000, tzinfo=UTC), "2024-05-01T12:00:00.120000Z"),
        # An offset moves the date too: 00:30 at +02:00 is the day before in UTC.
        (
            datetime(2024, 3, 1, 0, 30, 0, 7, tzinfo=timezone(timedelta(hours=2))),
            "2024-02-29T22:30:00.000007Z",
        ),
        (
            datetime(2024, 1, 1, 23, 0, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
            "2024-01-02T04:30:00.000000Z",
        ),
        (datetime(2024, 1, 1, 9, 0, tzinfo=timezone(timedelta(0))), "2024-01-01T09:00:00.000000Z"),
    ],
)
def test_rfc3339_exact_format(moment: datetime, text: str) -> None:
    assert envelope.rfc3339(moment) == text


def test_rfc3339_matches_strftime_for_many_moments() -> None:
    # The formatting this replaced, kept here as the reference.
    def reference(moment: datetime) -> str:
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    start = datetime(2023, 12, 31, 22, 59, 58, 1, tzinfo=UTC)
    zones = [UTC, None, timezone(timedelta(hours=1)), timezone(timedelta(hours=-9, minutes=-45))]
    for step in range(2000):
        moment = start + timedelta(seconds=step * 3607, microseconds=step * 7919)
        for zone in zones:
            local = moment.replace(tzinfo=None) if zone is None else moment.astimezone(zone)
            assert envelope.rfc3339(local) == reference(local), local


def test_output_of_a_fresh_request_has_one_tracking_entry() -> None:
    now = datetime.now(UTC)
    out = envelope.build_output(KreNatsMessage(), "n", packed("x"), now, now)
    assert [t.node_name for t in out.tracking] == ["n"]
    assert out.replied is False


def test_early_reply_is_marked_replied_and_keeps_ids() -> None:
    req = request()
    req.replied = False
    reply = envelope.build_early_reply(req, packed("early"))
    assert reply.replied is True
    assert reply.tracking_id == "track-1"
    assert reply.reply == "_INBOX.reply"
    assert reply.payload == packed("early")


def test_error_envelope_text_and_tracking_id() -> None:
    error = envelope.build_error(request(), "track-1", "node-b", "boom")
    assert error.error == "error in 'node-b': boom"
    assert error.tracking_id == "track-1"
    assert error.reply == "_INBOX.reply"
    assert not error.HasField("payload")


def test_error_envelope_without_a_request_has_an_empty_tracking_id() -> None:
    error = envelope.build_error(None, "", "node-b", "bad input: empty message")
    assert error.error == "error in 'node-b': bad input: empty message"
    assert error.tracking_id == ""
    assert len(error.tracking) == 0


def test_small_outputs_are_not_compressed() -> None:
    msg = request()
    data = envelope.encode(msg, MIB)
    assert not envelope.is_compressed(data)
    assert data == msg.SerializeToString()
    assert envelope.decode_input(data, MIB) == msg


def test_outputs_over_the_threshold_are_gzipped_and_decodable() -> None:
    msg = request()
    msg.payload.CopyFrom(packed("x" * (2 * MIB)))
    data = envelope.encode(msg, MIB)
    assert envelope.is_compressed(data)
    assert len(data) < MIB
    # Any KRE node reads it back with plain gzip.
    assert gzip.decompress(data) == msg.SerializeToString()
    assert envelope.decode_input(data, 4 * MIB) == msg


def _gzip_level(data: bytes) -> str:
    # The gzip header's XFL byte: 4 for the fastest level, 2 for the best, 0 otherwise.
    return {4: "fastest", 2: "best"}.get(data[8], "other")


def test_outputs_are_gzipped_at_the_fastest_level() -> None:
    msg = request()
    msg.payload.CopyFrom(packed("some words " * 200_000))
    data = envelope.encode(msg, MIB)
    assert _gzip_level(data) == "fastest"
    assert gzip.decompress(data) == msg.SerializeToString()


def _text_like(size: int) -> str:
    # Words from a small vocabulary: level 9 gzips it measurably smaller than level 1.
    rng = random.Random(5)
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(512)]
    return " ".join(rng.choice(vocab) for _ in range(size // 6))[:size]


def test_over_the_limit_at_level_1_retries_at_the_best_level() -> None:
    msg = request()
    msg.payload.CopyFrom(packed(_text_like(400_000)))
    raw = msg.SerializeToString()
    fastest, best = len(gzip.compress(raw, 1)), len(gzip.compress(raw, 9))
    assert best < fastest

    data = envelope.encode(msg, MIB, limit=best)  # only the best level fits
    assert _gzip_level(data) == "best" and len(data) == best
    assert envelope.decode_input(data, MIB) == msg
    assert _gzip_level(envelope.encode(msg, MIB, limit=fastest)) == "fastest"

    with pytest.raises(PayloadTooLargeError) as info:
        envelope.encode(msg, MIB, limit=best - 1)
    assert info.value.size == best  # the error names the smallest size it reached
    assert info.value.raw_size == len(raw)


def test_threshold_is_inclusive_like_kre() -> None:
    msg = request()
    msg.payload.CopyFrom(packed("z" * 4096))
    size = len(msg.SerializeToString())
    assert not envelope.is_compressed(envelope.encode(msg, size))
    assert envelope.is_compressed(envelope.encode(msg, size - 1))


def test_output_too_large_even_when_gzipped_is_refused() -> None:
    msg = request()
    msg.payload.CopyFrom(packed(os.urandom(64 * 1024).hex()))
    with pytest.raises(PayloadTooLargeError) as info:
        envelope.encode(msg, 1024)
    assert info.value.limit == 1024
    raw = len(msg.SerializeToString())
    assert info.value.raw_size == raw and info.value.size < raw
    assert f"output envelope is {raw} bytes, {info.value.size} bytes after gzip" in str(info.value)


def test_a_hard_limit_below_the_gzip_threshold_gzips_and_refuses() -> None:
    msg = request()
    msg.payload.CopyFrom(packed("z" * 4096))
    size = len(msg.SerializeToString())
    # Under the KRE threshold but over the limit: gzip makes it fit.
    assert envelope.is_compressed(envelope.encode(msg, MIB, limit=size - 1))
    msg.payload.CopyFrom(packed(os.urandom(4096).hex()))
    with pytest.raises(PayloadTooLargeError):
        envelope.encode(msg, MIB, limit=1024)


def test_gzipped_input_from_kre_is_decoded() -> None:
    msg = request()
    data = gzip.compress(msg.SerializeToString(), compresslevel=9)
    assert envelope.decode_input(data, MIB) == msg


def test_gzip_bomb_is_capped() -> None:
    bomb = gzip.compress(b"\0" * (32 * MIB))
    assert len(bomb) < 64 * 1024
    with pytest.raises(BadInputError, match="over the 1048576 byte limit"):
        envelope.decode_input(bomb, MIB)


def test_gunzip_stops_at_the_cap_without_inflating_everything() -> None:
    # 256 MiB of zeros in about 256 KiB: inflating it all would need the 256 MiB.
    compressor = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = b"\0" * MIB
    bomb = b"".join(compressor.compress(chunk) for _ in range(256)) + compressor.flush()
    with pytest.raises(BadInputError, match="over the"):
        envelope.gunzip(bomb, MIB)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty message"),
        (b"not a protobuf", "not a KreNatsMessage protobuf"),
        (request().SerializeToString()[:-3], "not a KreNatsMessage protobuf"),
        (b"\x1f\x8b\x08\x00garbage-not-deflate", "bad gzip data"),
        (gzip.compress(request().SerializeToString())[:-12], "truncated gzip data"),
        (gzip.compress(b""), "empty message once decompressed"),
        (gzip.compress(b"\xff\xff\xff"), "not a KreNatsMessage protobuf"),
        (gzip.compress(request().SerializeToString()) + b"junk", "unexpected bytes"),
    ],
    ids=[
        "empty",
        "not-protobuf",
        "truncated-protobuf",
        "bad-gzip",
        "truncated-gzip",
        "empty-gzip",
        "gzipped-garbage",
        "trailing-junk",
    ],
)
def test_bad_inputs_give_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(BadInputError) as info:
        envelope.decode_input(data, MIB)
    assert reason in info.value.reason
    assert str(info.value).startswith("bad input message: ")


def test_uncompressed_input_over_the_limit_is_refused() -> None:
    with pytest.raises(BadInputError, match="over the 10 byte limit"):
        envelope.decode_input(request().SerializeToString(), 10)


def test_an_input_is_held_to_the_size_its_gzip_trailer_declares() -> None:
    # The window is charged that size before decompressing: more is refused. So are
    # concatenated gzip members (KRE's runners write one), whose last trailer declares
    # only the last member.
    data = request().SerializeToString()
    assert envelope.declared_size(gzip.compress(data)) == len(data)
    assert envelope.declared_size(data) is None
    lying = gzip.compress(data)[:-4] + (10).to_bytes(4, "little")
    with pytest.raises(BadInputError, match="inflates past the 10 bytes its trailer declares"):
        envelope.decode_input(lying, MIB)
    half = len(data) // 2
    two_members = gzip.compress(data[:half]) + gzip.compress(data[half:])
    with pytest.raises(BadInputError, match="its trailer declares"):
        envelope.decode_input(two_members, MIB)


def test_a_gzip_declaring_more_than_the_limit_is_refused_before_decompressing() -> None:
    bomb = gzip.compress(b"\0" * (64 * MIB))  # about 64 KB that declare 64 MiB
    with pytest.raises(BadInputError, match=f"over the {MIB} byte limit .*declares {64 * MIB}"):
        envelope.decode_input(bomb, MIB)


def _field(number: int, wire_type: int) -> bytes:
    return bytes([(number << 3) | wire_type])


def _bytes_field(number: int, value: bytes) -> bytes:
    assert len(value) < 128
    return _field(number, 2) + bytes([len(value)]) + value


def test_byte_compatibility_with_hand_built_wire_bytes() -> None:
    # KRE's KreNatsMessage, field by field: tracking_id=1, tracking=2 (node_name=1, start=2,
    # end=3), reply=3, payload=4 (Any: type_url=1, value=2), error=5, replied=6 (varint).
    tracking = (
        _bytes_field(1, b"node-a")
        + _bytes_field(2, b"2024-01-01T00:00:00.000000Z")
        + _bytes_field(3, b"2024-01-01T00:00:01.000000Z")
    )
    any_bytes = _bytes_field(1, b"type.googleapis.com/google.protobuf.StringValue") + (
        _bytes_field(2, _bytes_field(1, b"hi"))
    )
    wire = (
        _bytes_field(1, b"abc-123")
        + _bytes_field(2, tracking)
        + _bytes_field(3, b"_INBOX.x")
        + _bytes_field(4, any_bytes)
        + _bytes_field(5, b"oops")
        + _field(6, 0)
        + b"\x01"
    )

    msg = envelope.decode_input(wire, MIB)

    assert msg.tracking_id == "abc-123"
    assert msg.tracking[0].node_name == "node-a"
    assert msg.tracking[0].start == "2024-01-01T00:00:00.000000Z"
    assert msg.tracking[0].end == "2024-01-01T00:00:01.000000Z"
    assert msg.reply == "_INBOX.x"
    assert msg.error == "oops"
    assert msg.replied is True
    value = wrappers_pb2.StringValue()
    assert msg.payload.Unpack(value) and value.value == "hi"
    # And the same bytes come back out: nothing is reordered or renamed.
    assert msg.SerializeToString() == wire


def test_unknown_fields_from_newer_kre_versions_are_tolerated() -> None:
    # Later KRE versions added fields (request_id, early_exit...): they must not break decoding.
    wire = _bytes_field(1, b"abc") + _bytes_field(7, b"req-9") + _field(8, 0) + b"\x01"
    assert envelope.decode_input(wire, MIB).tracking_id == "abc"
