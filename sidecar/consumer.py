"""The consumer loop: pull from JetStream, one task per message, under a bounded window.

One shape: `while running:` wait until the handler host is SERVING, take the free
slots of the in-flight window (counted in messages and in bytes), fetch up to that
many messages (a fetch timeout is normal and suppressed), start one task per message
(`sidecar.message`). Beside it one keep-alive task sends the in-progress acks of every
long-running message. Stopping is a written sequence: stop fetching, give in-flight
messages the grace period, nak what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from sidecar import metrics
from sidecar.binding import check_subjects, consumer_gone, ensure_consumer
from sidecar.channel import HandlerChannel
from sidecar.errors import PUBLISH_ERRORS, ConsumerConflict, SubjectNotCaptured, describe
from sidecar.isolation import SoloGate, Suspects
from sidecar.message import InFlight, MessageProcessor
from sidecar.pubacks import PubAcks
from sidecar.publisher import Publisher
from sidecar.pull import position
from sidecar.settings import SidecarSettings
from sidecar.window import Window


class Pull(Protocol):
    """What the loop needs of a pull subscription: nats-py's, or `sidecar.pull.Puller`."""

    async def fetch(self, batch: int, timeout: float) -> list[Msg]: ...

    async def unsubscribe(self) -> list[Msg] | None:
        """Stop; the messages received but never handed out, if it holds any."""
        ...


# Binds to a durable consumer (durable, stream); by default `js.pull_subscribe_bind`.
BindPull = Callable[[str, str], Awaitable[Pull]]

log = logging.getLogger(__name__)

T = TypeVar("T")

FETCH_TIMEOUT = 1.0  # also how long stopping may wait for the last fetch
BIND_RETRY = 3.0  # while the consumer cannot be bound (stream missing, conflict, subjects)
FETCH_ERROR_PAUSE = 1.0
# What one fetch may bring at most, counting every message at the server's max_payload:
# the server must never have to push a burst the sidecar cannot read in time (it would
# cut the connection as a slow consumer, past its max_pending: 64 MB by default, twice
# this). The window still bounds what is in flight. With the default 1 MiB max_payload
# a fetch asks for up to 32 messages; fewer slows small messages down (docs/performance.md,
# "Fetch sizes under the byte budget").
FETCH_MAX_BYTES = 32 * 1024 * 1024
# An in-progress ack is due once a message has been silent for ack_wait / 3.
KEEP_ALIVE_FRACTION = 3
# How long a suspect waits for the host to finish messages the sidecar gave up on, when
# no result timeout says it (KRT_HANDLER_TIMEOUT=0: the sidecar never gives up on one).
SOLO_IDLE_WAIT = 30.0


def due_for_in_progress(records: Iterable[InFlight], silent_since: float) -> list[InFlight]:
    """The unsettled records that JetStream has heard nothing about since `silent_since`."""
    return [r for r in records if not r.settled and r.pinged_at <= silent_since]


class Consumer:
    """Owns the durable pull consumer and every message fetched from it."""

    def __init__(
        self,
        settings: SidecarSettings,
        js: JetStreamContext,
        channel: HandlerChannel,
        max_payload: int | None = None,
        pub_acks: PubAcks | None = None,
        bind_pull: BindPull | None = None,
    ) -> None:
        self.settings = settings
        self._js = js
        self._bind_pull = bind_pull or self._js_bind
        self._channel = channel
        self._window = Window(settings.max_in_flight, settings.max_in_flight_bytes)
        publisher = Publisher(js, settings.nats_stream, settings.node_name, pub_acks)
        # Messages that were in the handler host when it failed (`sidecar.isolation`).
        self._suspects = Suspects()
        self._processor = MessageProcessor(
            settings, channel, publisher, max_payload, self._suspects
        )
        self._max_payload = max_payload
        # What a message is expected to weigh, for sizing fetches under the byte budget:
        # the largest recent one (max_payload until the first arrives; see _count_size).
        self._size_hint = max_payload or 0
        self._stopping = asyncio.Event()
        self._in_flight: dict[asyncio.Task[None], InFlight] = {}
        self._solo = SoloGate(
            self._in_flight.keys,
            lambda timeout: self._channel.wait_idle(timeout),
            settings.result_timeout or SOLO_IDLE_WAIT,
        )
        self._task: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._sub: Pull | None = None
        self._warned: set[tuple[str, str]] = set()  # warnings given once per process
        self.bound = False
        self.status = "not started"

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def bytes_in_flight(self) -> int:
        return self._window.bytes

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="consumer-loop")
        self._keeper = asyncio.create_task(self._keep_alive(), name="consumer-keep-alive")

    async def stop(self, grace: float) -> None:
        """Stop fetching, give in-flight messages `grace` seconds, nak what is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self._stopping.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        self.bound = False
        self.status = "stopped"
        tasks, records = list(self._in_flight), list(self._in_flight.values())
        if tasks:
            log.info("waiting up to %.1fs for %d in-flight messages", grace, len(tasks))
            _, late = await asyncio.wait(tasks, timeout=max(deadline - loop.time(), 0))
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._keeper is not None:  # before the naks: a nak'ed message is not ours to keep
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        await self._abandon([record for record in records if not record.settled])
        log.info("consumer stopped")

    async def _abandon(self, records: list[InFlight]) -> None:
        if not records:
            return
        log.warning("nak'ing %d messages still unfinished after the grace period", len(records))
        for record in records:
            await self._processor.abandon(record)

    async def _let_go(self, sub: Pull) -> None:
        """Unsubscribe; what it had fetched and never handed out goes back at once."""
        with contextlib.suppress(*PUBLISH_ERRORS, ValueError):
            for msg in await sub.unsubscribe() or ():
                await self._processor.abandon(InFlight(msg))

    # The loop

    async def _run(self) -> None:
        # Supervised: a bug or an error nobody foresaw in one pass must not leave the
        # sidecar alive but consuming nothing.
        while not self._stopping.is_set():
            try:
                await self._run_once()
            except Exception:
                self.status = "consumer loop failed; restarting"
                log.exception("the consumer loop failed; restarting it in %ss", BIND_RETRY)
                await self._unless_stopping(asyncio.sleep(BIND_RETRY))

    async def _run_once(self) -> None:
        sub = await self._bind()
        try:
            await self._consume(sub)
        finally:
            # Unsubscribed here, not left to the NATS drain, which would wait on the
            # pull inbox's leftover status messages until its timeout.
            self.bound = False
            if self._sub is not None:
                await self._let_go(self._sub)
                self._sub = None

    async def _consume(self, sub: Pull | None) -> None:
        while sub is not None and not self._stopping.is_set():
            if not await self._unless_stopping(self._channel.wait_ready()):
                break
            # Nothing is fetched beside a suspect that waits to run alone, or runs.
            if not await self._unless_stopping(self._solo.clear()):
                break
            slots = await self._unless_stopping(self._window.take_all())
            if not slots:
                break
            self.status = "consuming"
            msgs: list[Msg] | None = []
            try:
                msgs = await self._fetch(sub, self._batch(slots))
            finally:
                self._window.give_back(slots - len(msgs or []))
            if msgs is None:
                sub = await self._bind(sub)
                continue
            for msg in msgs:
                self._start(msg)

    def _batch(self, slots: int) -> int:
        """How many messages to ask for: the free slots, within the byte limits.

        The pull request's `max_bytes` is not sent (the server answers 409 rather than
        send a message bigger than it, which would stall a small budget), so sizes are
        estimated. What the server may push in one go is counted at its max_payload:
        at most FETCH_MAX_BYTES. The room left under the byte budget is counted at the
        size of recent messages (`_size_hint`): counted at max_payload too, a budget of
        a few MiB would fetch 100-byte messages a few at a time. A jump in size can then
        overshoot the budget by one fetch; the hint follows the jump at once. At least
        one message, so a budget below max_payload still moves.
        """
        if not self._max_payload:
            return slots
        count = min(slots, FETCH_MAX_BYTES // self._max_payload)
        if self._window.bytes_free is not None:
            count = min(count, self._window.bytes_free // max(self._size_hint, 1))
        return max(1, count)

    def _count_size(self, size: int) -> None:
        """Up at once to a bigger message; down by 1/16 per smaller one (half-life ~11)."""
        self._size_hint = max(size, self._size_hint - self._size_hint // 16)

    async def _unless_stopping(self, awaitable: Awaitable[T]) -> T | None:
        """Await `awaitable` unless stop() comes first; None when stopping."""
        work = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if work.done():
            return work.result()
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        return None

    async def _fetch(self, sub: Pull, batch: int) -> list[Msg] | None:
        """Up to `batch` messages; [] on a quiet timeout; None when the consumer is gone."""
        try:
            return await sub.fetch(batch, timeout=FETCH_TIMEOUT)
        except TimeoutError:  # nats' own, and the plain one nats-py also raises
            return []
        except nats.js.errors.ServiceUnavailableError as exc:
            # 503, no responders: JetStream is restarting (wait it out), or the consumer
            # is gone (deleted by hand): bind again, which creates it.
            self.status = f"fetch failed: {describe(exc)}"
            if await consumer_gone(self._js, self.settings):
                log.warning("consumer %s is gone; creating it again", self.settings.durable)
                return None
            log.warning("JetStream unavailable (%s); fetching again in %ss", exc, FETCH_ERROR_PAUSE)
            await asyncio.sleep(FETCH_ERROR_PAUSE)
            return []
        except nats.js.errors.APIError as exc:
            log.error("fetch from consumer %s failed: %s", self.settings.durable, exc)
            return None
        except nats.errors.Error as exc:
            self.status = f"fetch failed: {describe(exc)}"
            log.warning("fetch failed (%s); trying again in %ss", describe(exc), FETCH_ERROR_PAUSE)
            await asyncio.sleep(FETCH_ERROR_PAUSE)
            return []

    async def _bind(self, old: Pull | None = None) -> Pull | None:
        """Create (or update) the durable consumer, check the subjects, bind; retry until it works.

        A problem is logged once and shown by /readyz (`status`) while it lasts; the
        retries are quiet, so an operator's fix (deleting a conflicting consumer, adding a
        subject to a stream) is picked up without a restart.
        """
        self.bound = False
        if old is not None:
            await self._let_go(old)
            self._sub = None
        stream, durable = self.settings.nats_stream, self.settings.durable
        problem = ""
        while not self._stopping.is_set():
            try:
                await ensure_consumer(self._js, self.settings)
                await check_subjects(self._js, self.settings, self._warned)
                sub = await self._bind_pull(durable, stream)
            except nats.js.errors.NotFoundError:
                problem = self._failed(problem, f"stream {stream} not found")
            except (ConsumerConflict, SubjectNotCaptured) as exc:
                problem = self._failed(problem, str(exc))
            except PUBLISH_ERRORS as exc:
                problem = self._failed(
                    problem, f"cannot bind consumer {durable} on stream {stream}: {describe(exc)}"
                )
            else:
                if problem:
                    log.info("recovered: consumer %s on stream %s is bound", durable, stream)
                self._sub = sub
                self.bound = True
                log.info(
                    "consuming %s from stream %s as durable consumer %s",
                    ",".join(self.settings.nats_inputs),
                    stream,
                    durable,
                )
                return sub
            await self._unless_stopping(asyncio.sleep(BIND_RETRY))
        return None

    def _failed(self, logged: str, problem: str) -> str:
        """/readyz says `problem` while it lasts; the log says it once, not at every retry."""
        self.status = problem
        if problem != logged:
            log.error("%s; retrying every %ss", problem, BIND_RETRY)
        return problem

    async def _js_bind(self, durable: str, stream: str) -> Pull:
        return await self._js.pull_subscribe_bind(durable=durable, stream=stream)

    # One message

    def _start(self, msg: Msg) -> None:
        record = InFlight(msg, size=len(msg.data))
        self._count_size(record.size)
        self._window.add_bytes(record.size)
        # Parsed again by `prepare`; only looked up while there are suspects at all.
        known = self._suspects.of(position(msg)[0]) if self._suspects else None
        if known is not None:
            record.excused = known.excused
        if known is not None and known.alone:
            task = asyncio.create_task(self._handle_alone(record))
            self._solo.queue(task)  # before the next fetch
        else:
            task = asyncio.create_task(self._handle(record))
        self._in_flight[task] = record
        metrics.IN_FLIGHT.inc()
        task.add_done_callback(self._finished)

    async def _handle_alone(self, record: InFlight) -> None:
        """A suspect: run once everything else has left the handler host, nothing beside it."""
        held, parked = record.size, True
        self._window.park(held)  # a reservation must not wait for this one's bytes
        try:
            async with self._solo.alone():
                self._window.unpark(held)
                parked = False
                record.alone = True
                log.info(
                    "stream seq %d runs alone in the handler host (%d more suspects waiting)",
                    position(record.msg)[0],
                    self._solo.waiting - 1,
                )
                await self._handle(record)
        finally:
            if parked:
                self._window.unpark(held)

    async def _handle(self, record: InFlight) -> None:
        # A gzipped input takes its decompressed size in memory: charged to the window
        # before it is decompressed, and expected of the next fetches.
        size = self._processor.prepare(record)
        if size > record.size:
            await self._window.reserve(record.size, size - record.size)
            record.size = size
            self._count_size(size)
        await self._processor.process(record, await self._processor.decode(record))

    def _finished(self, task: asyncio.Task[None]) -> None:
        record = self._in_flight.pop(task, None)
        self._window.give_back(1, record.size if record else 0)
        metrics.IN_FLIGHT.dec()

    # In-progress acks

    async def _keep_alive(self) -> None:
        """In-progress acks for long-running messages, so none is redelivered while it runs.

        One task for all, not a task and a timer per message. It looks every ack_wait / 6
        for messages silent for ack_wait / 3: none is silent for more than half the wait.
        """
        due_after = self.settings.ack_wait / KEEP_ALIVE_FRACTION
        while True:
            await asyncio.sleep(due_after / 2)
            try:
                await self._send_in_progress(time.monotonic() - due_after)
            except Exception:
                # Never the end of keep-alives: every long message would be redelivered.
                log.exception("sending in-progress acks failed; trying again next time")

    async def _send_in_progress(self, silent_since: float) -> None:
        for record in due_for_in_progress(list(self._in_flight.values()), silent_since):
            if record.settled:  # settled while an earlier in_progress() was awaited
                continue
            sent = time.monotonic()
            with contextlib.suppress(*PUBLISH_ERRORS):  # not sent: due again at the next look
                await record.msg.in_progress()
                record.pinged_at = sent
