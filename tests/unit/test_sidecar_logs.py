"""The sidecar's lines about a message carry its node, tracking id and attempt, never data."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from sidecar import logs


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield io.StringIO()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def _log_about_a_message(stream: io.StringIO, fmt: str) -> list[str]:
    logs.configure("INFO", fmt, "node-a")
    logging.getLogger().handlers[0].stream = stream  # type: ignore[attr-defined]

    async def one_message() -> None:
        logs.bind(42, 3)
        logs.tag(tracking_id="t-1", traceparent="")
        logging.getLogger("sidecar.message").warning("handler failed: %s", "boom")

    asyncio.run(one_message())
    logging.getLogger("sidecar.main").info("not about a message")
    return stream.getvalue().splitlines()


def test_json_lines_carry_the_message_tags(captured: io.StringIO) -> None:
    about, other = (json.loads(line) for line in _log_about_a_message(captured, "json"))
    assert about["msg"] == "handler failed: boom" and about["level"] == "WARNING"
    assert (about["node"], about["tracking_id"], about["attempt"]) == ("node-a", "t-1", 3)
    assert about["stream_seq"] == 42 and "traceparent" not in about
    assert other["node"] == "node-a" and "tracking_id" not in other


def test_text_lines_start_with_the_tags(captured: io.StringIO) -> None:
    about, other = _log_about_a_message(captured, "text")
    assert "[node=node-a tracking_id=t-1 attempt=3 stream_seq=42] handler failed: boom" in about
    assert other.endswith("sidecar.main: not about a message")
