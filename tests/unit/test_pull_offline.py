"""Puller while NATS is disconnected: no pull request is buffered for the reconnect."""

from __future__ import annotations

import time

import nats.errors
import pytest

from sidecar.pull import Puller


class OfflineNc:
    is_connected = False

    def __init__(self) -> None:
        self.published: list[str] = []

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "") -> None:
        self.published.append(subject)


async def test_a_fetch_while_disconnected_asks_nothing_and_times_out() -> None:
    nc = OfflineNc()
    puller = Puller(nc, "S", "d")  # type: ignore[arg-type]
    puller._sub = object()  # type: ignore[assignment]  # bound (what bind() sets)
    began = time.monotonic()

    with pytest.raises(nats.errors.TimeoutError):
        await puller.fetch(32, timeout=0.2)

    assert time.monotonic() - began >= 0.2
    assert nc.published == []
