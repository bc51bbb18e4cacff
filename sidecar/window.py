"""The bounded in-flight window: how many messages, and how many bytes, at once.

The consumer takes slots before it fetches and gives them back as messages end; a
gzipped input is charged its decompressed size, as its gzip trailer declares it, before
a byte of it is decompressed (`reserve`). So what the sidecar holds is bounded by
KRT_MAX_IN_FLIGHT_BYTES, or by one message alone when a message is larger than that.
"""

from __future__ import annotations

import asyncio


class Window:
    """At most `size` messages, and about `max_bytes`.

    Slots are taken only while the bytes in flight are under `max_bytes`, so the bytes
    can go over it by what one fetch brings; a message larger than the whole budget
    still goes through, and nothing is taken beside it until it ends.
    """

    def __init__(self, size: int, max_bytes: int | None = None) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0
        self._free = size
        self._changed = asyncio.Event()
        # Reservations wait their turn, oldest first; `_queued` is what the messages
        # waiting for one hold already (their bytes as fetched).
        self._reserving = asyncio.Lock()
        self._queued = 0

    @property
    def in_flight(self) -> int:
        return self.size - self._free

    @property
    def bytes_free(self) -> int | None:
        """Room left under the byte budget; None without one."""
        return None if self.max_bytes is None else max(self.max_bytes - self.bytes, 0)

    def _full(self) -> bool:
        return self._free <= 0 or (self.max_bytes is not None and self.bytes >= self.max_bytes)

    async def take_all(self) -> int:
        """Wait for a free slot and room under the byte budget, then take every free slot."""
        while self._full():
            await self._wait_for_change()
        taken, self._free = self._free, 0
        return taken

    def add_bytes(self, size: int) -> None:
        """Count a fetched message's bytes; give_back returns them."""
        self.bytes += size

    async def reserve(self, held: int, extra: int) -> None:
        """Charge `extra` more bytes for a message that holds `held`, once they fit.

        They fit under the budget, or the message is alone: every other byte in flight
        belongs to messages waiting for a reservation themselves, so waiting longer would
        wait forever. One reservation at a time, in the order they were asked for.
        """
        self._queued += held
        self._changed.set()  # the one whose turn it is may now be alone
        queued = True
        try:
            async with self._reserving:
                self._queued -= held
                queued = False
                while not self._fits(held, extra):
                    await self._wait_for_change()
                self.bytes += extra
        finally:
            if queued:  # cancelled while waiting for its turn
                self._queued -= held

    def park(self, held: int) -> None:
        """A message that waits for its turn elsewhere (to run alone) holds `held` bytes
        that nothing can free before its turn: a reservation need not wait for them."""
        self._queued += held
        self._changed.set()

    def unpark(self, held: int) -> None:
        self._queued -= held

    def _fits(self, held: int, extra: int) -> bool:
        if self.max_bytes is None or self.bytes + extra <= self.max_bytes:
            return True
        return self.bytes - held - self._queued <= 0

    def give_back(self, count: int = 1, size: int = 0) -> None:
        self._free += count
        self.bytes -= size
        self._changed.set()

    async def _wait_for_change(self) -> None:
        self._changed.clear()
        await self._changed.wait()
