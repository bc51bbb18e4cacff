"""In-memory stand-ins for nats-py's pull subscription and messages, for consumer tests."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import nats.errors
import nats.js.errors

from sidecar.settings import SidecarSettings


def consumer_settings(**overrides: Any) -> SidecarSettings:
    """Settings for a consumer under test: no real server behind them."""
    base = SidecarSettings(
        node_name="n",
        nats_servers=("nats://127.0.0.1:1",),
        nats_inputs=("in",),
        nats_output="out",
        nats_stream="S",
        durable="n",
    )
    return replace(base, **overrides)


class FakeMsg:
    """A fetched message: its bytes, and the in-progress acks it was sent (monotonic times)."""

    def __init__(self, size: int, name: str = "", fail_first_in_progress: bool = False) -> None:
        self.data = b"x" * size
        self.name = name
        self.fetched_at = 0.0
        self.in_progress_at: list[float] = []
        self._fail_next = fail_first_in_progress

    async def in_progress(self) -> None:
        if self._fail_next:
            self._fail_next = False
            raise nats.errors.ConnectionClosedError
        self.in_progress_at.append(time.monotonic())

    async def nak(self, delay: float | None = None) -> None:
        pass


class ServingSub:
    """A pull subscription serving `messages` in order; `batches` records what was asked."""

    def __init__(self, messages: list[FakeMsg]) -> None:
        self.queue = list(messages)
        self.batches: list[int] = []

    async def fetch(self, batch: int, timeout: float) -> list[FakeMsg]:
        self.batches.append(batch)
        if not self.queue:
            await asyncio.sleep(0.01)
            return []
        taken, self.queue = self.queue[:batch], self.queue[batch:]
        for msg in taken:
            msg.fetched_at = time.monotonic()
        return taken

    async def unsubscribe(self) -> None:
        pass


class FakeJs:
    """The JetStream context: binding gives `sub` (any fake subscription) and counts."""

    def __init__(self, sub: Any) -> None:
        self.sub = sub
        self.binds = 0
        self.consumer_exists = True
        self.config: Any = None  # what add_consumer was given: the consumer as it is

    async def consumer_info(self, stream: str, durable: str) -> Any:
        if not self.consumer_exists or self.config is None:
            raise nats.js.errors.NotFoundError
        return SimpleNamespace(name=durable, config=self.config)

    async def add_consumer(self, stream: str, config: Any) -> None:
        self.config = config

    async def pull_subscribe_bind(self, durable: str, stream: str) -> Any:
        self.binds += 1
        return self.sub

    async def stream_info(self, stream: str) -> Any:
        return SimpleNamespace(config=SimpleNamespace(subjects=["in", "out", "out.dlq"]))


class ReadyChannel:
    async def wait_ready(self) -> bool:
        return True

    async def wait_idle(self, timeout: float) -> bool:
        return True  # the host runs nothing the sidecar gave up on
