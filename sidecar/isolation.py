"""Finding the message that crashes or blocks the handler host, and charging only it.

When the host dies, its stream breaks, or a Result does not come in time, every
message in the host at that moment is a suspect: `outcome.decide` naks each one
without counting the attempt and asks for it to run alone from then on. `Suspects`
remembers that, per stream sequence: how many deliveries were excused and whether
the message must run alone. `SoloGate` runs such a message with nothing else in the
host: it waits for every other message to end (and for the host to finish what the
sidecar gave up waiting for), while the consumer fetches nothing. A suspect that
fails the host alone is the culprit: that failure counts, and at KRT_MAX_DELIVER it
is dead-lettered. A good neighbour succeeds alone and is answered once.

The record is in memory and bounded (MAX_SUSPECTS, oldest forgotten first). It is
lost when the sidecar restarts, and another replica on the same consumer has its
own: a message then comes back without its excuse and runs among others again, so
each lost record can cost a good message one counted attempt, and a culprit can take
the host down once more before it runs alone. An excuse is only ever given to a
message that was not alone, and a message is alone from its first excuse on, so one
sidecar excuses a message at most once: deliveries stay bounded by KRT_MAX_DELIVER
plus the number of records lost.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from sidecar.outcome import Action, Nak

log = logging.getLogger(__name__)

# Messages remembered at once: more than any window holds, a few hundred KB at most.
MAX_SUSPECTS = 10_000


@dataclass(slots=True)
class Suspicion:
    excused: int = 0  # deliveries that did not count toward KRT_MAX_DELIVER
    alone: bool = False  # runs alone in the handler host from now on


class Suspects:
    """Per stream sequence, what the sidecar knows of earlier host failures."""

    def __init__(self, limit: int = MAX_SUSPECTS) -> None:
        self._limit = limit
        self._known: collections.OrderedDict[int, Suspicion] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._known)

    def of(self, seq: int) -> Suspicion:
        """What is known of `seq` (a blank Suspicion when nothing is)."""
        return self._known.get(seq) or Suspicion()

    def settled(self, seq: int, action: Action) -> None:
        """Carry out what the message's action says about it: remember, or forget it."""
        if not isinstance(action, Nak):  # it has ended: nothing to remember
            self._known.pop(seq, None)
            return
        if action.counted and not action.alone_next and seq not in self._known:
            return  # the common retry: nothing to remember
        known = self._known.pop(seq, None) or Suspicion()
        known.excused += 0 if action.counted else 1
        known.alone = known.alone or action.alone_next
        self._known[seq] = known  # the newest last: the oldest goes first
        while len(self._known) > self._limit:
            self._known.popitem(last=False)


class SoloGate:
    """Runs one message at a time with nothing else in the handler host.

    `queue(task)` when the task is created (so the consumer stops fetching at once),
    then the task runs its work inside `alone()`. `clear()` is awaited by the
    consumer before each fetch.
    """

    def __init__(
        self,
        in_flight: Callable[[], Iterable[asyncio.Task[None]]],
        host_idle: Callable[[float], Awaitable[bool]] | None = None,
        idle_timeout: float = 30.0,
    ) -> None:
        self._in_flight = in_flight
        self._host_idle = host_idle
        self._idle_timeout = idle_timeout
        self._queued: set[asyncio.Task[None]] = set()
        self._turn = asyncio.Lock()
        self._clear = asyncio.Event()
        self._clear.set()

    @property
    def waiting(self) -> int:
        return len(self._queued)

    def queue(self, task: asyncio.Task[None]) -> None:
        self._queued.add(task)
        self._clear.clear()

    async def clear(self) -> bool:
        """Wait until no message waits to run alone; True (a value for `_unless_stopping`)."""
        await self._clear.wait()
        return True

    @asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        me = asyncio.current_task()
        try:
            async with self._turn:
                await self._others_done(me)
                await self._until_host_idle()
                yield
        finally:
            if me is not None:
                self._queued.discard(me)
            if not self._queued:
                self._clear.set()

    async def _until_host_idle(self) -> None:
        """Wait until the host has finished what the sidecar gave up on.

        A suspect run beside a message still blocking the host would be blamed for it.
        A host that stays blocked is restarted by its liveness probe, which ends the wait.
        """
        waited = 0.0
        while self._host_idle is not None and not await self._host_idle(self._idle_timeout):
            waited += self._idle_timeout
            log.warning(
                "the handler host still runs messages the sidecar gave up on (%.0fs): a "
                "suspect waits to run alone",
                waited,
            )

    async def _others_done(self, me: asyncio.Task[object] | None) -> None:
        while True:
            busy = [
                t
                for t in self._in_flight()
                if t is not me and t not in self._queued and not t.done()
            ]
            if not busy:
                return
            await asyncio.wait(busy)
