"""handler_host.logs: message tags, the JSON and text formatters, trace metadata."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from handler_host import logs
from handler_host.context import Context
from handler_host.logs import MessageTags
from protos import kre_nats_msg_pb2, runner_pb2

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    level = root.level
    yield io.StringIO()
    for handler in [h for h in root.handlers if h.get_name() == "kre-handler-host"]:
        root.removeHandler(handler)
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_tags_take_the_tracking_id_from_the_headers_when_the_envelope_has_none() -> None:
    tags = MessageTags.of("n", "", 2, {"Kre-Tracking-Id": "h-1", "TraceParent": TRACEPARENT})
    assert tags == MessageTags("n", "h-1", 2, TRACEPARENT)
    assert MessageTags.of("n", "env", 1, {"kre-tracking-id": "h-1"}).tracking_id == "env"


def test_tags_refuse_what_could_forge_a_log_line() -> None:
    tags = MessageTags.of("n", "a\nb", 1, {"traceparent": "00-xyz\nINFO fake line"})
    assert tags.tracking_id == "a?b"
    assert tags.traceparent == ""
    assert logs.valid_traceparent(TRACEPARENT.upper()) == TRACEPARENT


def test_json_lines_carry_the_tags_of_the_current_delivery(stream: io.StringIO) -> None:
    logs.configure("json", "INFO", node="scorer", stream=stream)
    other = logging.getLogger("some.library")

    other.info("outside")
    with logs.bind(MessageTags("scorer", "t-1", 3, TRACEPARENT)):
        other.warning("inside %s", "a delivery", extra={"rows": 3})

    outside, inside = lines(stream)
    assert outside["node"] == "scorer"
    assert "tracking_id" not in outside
    assert inside == {
        "ts": inside["ts"],
        "level": "WARNING",
        "logger": "some.library",
        "msg": "inside a delivery",
        "node": "scorer",
        "tracking_id": "t-1",
        "attempt": 3,
        "traceparent": TRACEPARENT,
        "rows": 3,
    }
    assert str(inside["ts"]).endswith("+00:00")


def test_json_formats_the_exception(stream: io.StringIO) -> None:
    logs.configure("json", "INFO", stream=stream)
    try:
        raise KeyError("row 7")
    except KeyError:
        logging.getLogger("x").exception("failed")

    (line,) = lines(stream)
    assert line["msg"] == "failed"
    assert "KeyError: 'row 7'" in str(line["exc_info"])


def test_ctx_logger_lines_in_json_and_text(stream: io.StringIO) -> None:
    ctx = Context("/tmp", node_name="scorer")

    async def emit(payload: object) -> None:
        raise AssertionError

    logs.configure("json", "INFO", node="scorer", stream=stream)
    with logs.bind(MessageTags("scorer", "t-1", 2, TRACEPARENT)):
        message_ctx = ctx.for_message("t-1", replied=False, emit_early=emit)  # type: ignore[arg-type]
    message_ctx.logger.info("scored %d rows", 3)  # outside the bind: the tags stay with ctx
    (line,) = lines(stream)
    assert (line["msg"], line["tracking_id"], line["attempt"]) == ("scored 3 rows", "t-1", 2)
    assert line["traceparent"] == TRACEPARENT

    text = io.StringIO()
    logs.configure("text", "INFO", node="scorer", stream=text)
    message_ctx.logger.info("scored")
    tags = "node=scorer tracking_id=t-1 attempt=2 trace_id=0af7651916cd43dd8448eb211c80319c"
    assert f"kre.user: [{tags}] scored" in text.getvalue()


def test_configure_replaces_only_its_own_handler(stream: io.StringIO) -> None:
    root = logging.getLogger()
    other = logging.StreamHandler(io.StringIO())
    root.addHandler(other)
    try:
        logs.configure("text", "DEBUG", stream=stream)
        logs.configure("json", "WARNING", stream=stream)
        ours = [h for h in root.handlers if h.get_name() == "kre-handler-host"]
        assert len(ours) == 1
        assert isinstance(ours[0].formatter, logs.JsonFormatter)
        assert other in root.handlers
        assert root.level == logging.WARNING
    finally:
        root.removeHandler(other)


def test_format_from_env_is_lenient() -> None:
    assert logs.format_from_env({"KRT_LOG_FORMAT": "JSON", "KRT_LOG_LEVEL": "debug"}) == (
        "json",
        "DEBUG",
    )
    assert logs.format_from_env({"KRT_LOG_FORMAT": "xml", "KRT_LOG_LEVEL": "loud"}) == (
        "text",
        "INFO",
    )


def test_call_metadata_fills_what_the_delivery_lacks() -> None:
    delivery = runner_pb2.Delivery(id=1, message=kre_nats_msg_pb2.KreNatsMessage())
    metadata = [("traceparent", TRACEPARENT), ("kre-tracking-id", "m-1"), ("user-agent", "x")]

    updated = logs.with_call_metadata(delivery, metadata)

    assert dict(updated.headers) == {"traceparent": TRACEPARENT, "kre-tracking-id": "m-1"}
    assert updated.message.tracking_id == "m-1"
    assert not delivery.headers  # the request itself is left alone

    own = runner_pb2.Delivery(
        message=kre_nats_msg_pb2.KreNatsMessage(tracking_id="own"), headers={"traceparent": "x"}
    )
    kept = logs.with_call_metadata(own, metadata)
    assert (kept.headers["traceparent"], kept.message.tracking_id) == ("x", "own")
    assert logs.with_call_metadata(delivery, None) is delivery


def test_default_stream_is_stderr(stream: io.StringIO) -> None:
    handler = logs.configure()
    assert isinstance(handler, logging.StreamHandler)
    assert handler.stream is sys.stderr
