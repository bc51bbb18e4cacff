"""Waiting on a condition with a deadline: the one way tests wait for something to happen."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

Check = Callable[[], bool | Awaitable[bool]]


async def eventually(
    check: Check, timeout: float = 20.0, what: str = "condition", poll: float = 0.01
) -> None:
    """Return once `check()` (sync or async) is true; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"{what}: not true after {timeout:g}s"
        await asyncio.sleep(poll)
