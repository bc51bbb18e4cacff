"""The sidecar process: settings, NATS, HTTP probes, the handler channel, the consumer.

`kre-sidecar` (or `python -m sidecar`) runs `main()`. Tests and tools can run it
in-process instead:

    sidecar = Sidecar(SidecarSettings.from_env(env))
    await sidecar.start()        # returns once NATS is connected and the loop runs
    ...
    await sidecar.stop()         # the SIGTERM sequence

Shutdown (SIGTERM/SIGINT): stop fetching, let in-flight messages finish within
KRT_SHUTDOWN_GRACE, nak whatever is left, drain NATS, close the channel, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from nats.aio.client import Client as NATS

from sidecar import logs
from sidecar.channel import HandlerChannel
from sidecar.connection import PlaintextServerError
from sidecar.consumer import Consumer
from sidecar.errors import RunnerError, SettingsError
from sidecar.http import HealthServer
from sidecar.pubacks import PubAcks
from sidecar.pull import Puller
from sidecar.settings import SidecarSettings

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
RECONNECT_WAIT = 2  # seconds; nats-py takes an int
DRAIN_TIMEOUT = 10


class Sidecar:
    """One sidecar: owns the NATS connection, the HTTP server, the channel and the consumer."""

    def __init__(self, settings: SidecarSettings) -> None:
        self.settings = settings
        self.nc: NATS | None = None
        self.channel = HandlerChannel(
            settings.handler_address, settings.grpc_max_message_bytes, settings.result_timeout
        )
        self.http = HealthServer(settings.http_host, settings.http_port, self.alive, self.ready)
        self.consumer: Consumer | None = None
        self._stopped = False
        self._last_nats_error = ""

    @property
    def http_port(self) -> int:
        """The port actually bound (KRT_HTTP_PORT=0 picks a free one)."""
        return self.http.port

    def alive(self) -> tuple[bool, str]:
        if self.consumer is None:
            return (not self._stopped), "starting"
        return self.consumer.alive, "consumer loop " + (
            "running" if self.consumer.alive else "dead"
        )

    def ready(self) -> tuple[bool, str]:
        if self.nc is None or not self.nc.is_connected:
            return False, "NATS not connected"
        if not self.channel.serving:
            return False, f"handler host not serving ({self.channel.status})"
        if self.consumer is None or not self.consumer.bound:
            status = self.consumer.status if self.consumer else "not started"
            return False, f"consumer not bound ({status})"
        return True, "ready"

    async def start(self) -> None:
        """Start serving probes, connect NATS (retrying forever), start channel and consumer."""
        log.info("sidecar starting: %s", self.settings.summary())
        if not self.settings.entrypoint_subject:
            log.warning(
                "KRT_NATS_ENTRYPOINT_SUBJECT is not set: error envelopes go to the output "
                "subject %s, so a later node must stop the workflow; KRE sets it for every node",
                self.settings.nats_output,
            )
        await self.http.start()
        await self.channel.start()
        security = self.settings.nats_security
        self.nc = security.client()
        await self.nc.connect(
            servers=list(self.settings.nats_servers),
            name=self.settings.node_name,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=RECONNECT_WAIT,
            drain_timeout=DRAIN_TIMEOUT,
            error_cb=self._nats_error,
            disconnected_cb=self._nats_disconnected,
            reconnected_cb=self._nats_reconnected,
            **security.connect_options(),
        )
        url = self.nc.connected_url
        # The URLs never hold credentials (sidecar.connection takes them out)
        log.info(
            "connected to NATS at %s:%s (%s)",
            url.hostname if url else "?",
            url.port if url else "?",
            security.describe(),
        )
        pub_acks = PubAcks(self.nc)
        await pub_acks.start()
        nc, prefix = self.nc, self.settings.js_api_prefix
        self.consumer = Consumer(
            self.settings,
            nc.jetstream(prefix=prefix),
            self.channel,
            nc.max_payload,
            pub_acks,
            bind_pull=lambda durable, stream: Puller.bind(nc, stream, durable, prefix),
        )
        self.consumer.start()

    async def _nats_error(self, exc: Exception) -> None:
        # Called on every failed reconnect attempt: say each distinct problem once.
        text = str(exc) or type(exc).__name__
        if text != self._last_nats_error:
            # A server without TLS is a misconfiguration, not a passing outage.
            level = logging.ERROR if isinstance(exc, PlaintextServerError) else logging.WARNING
            log.log(level, "NATS: %s", text)
        self._last_nats_error = text

    async def _nats_disconnected(self) -> None:
        if not self._stopped:
            log.warning("disconnected from NATS; reconnecting")

    async def _nats_reconnected(self) -> None:
        self._last_nats_error = ""
        log.info("reconnected to NATS")

    async def stop(self) -> None:
        """The shutdown sequence; safe to call after a partial start and more than once."""
        if self._stopped:
            return
        self._stopped = True
        log.info("sidecar stopping (grace %.1fs)", self.settings.shutdown_grace)
        if self.consumer is not None:
            await self.consumer.stop(self.settings.shutdown_grace)
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.drain()
            log.info("NATS connection drained")
        await self.channel.close()
        await self.http.close()
        log.info("sidecar stopped")


async def run(settings: SidecarSettings) -> None:
    """Run until SIGTERM or SIGINT, then shut down in order."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    sidecar = Sidecar(settings)
    starting = asyncio.create_task(sidecar.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done():
        starting.result()  # a failed start raises here
        await stopping
    else:
        log.info("signal received while starting")
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
    await sidecar.stop()


def main() -> None:
    """Console script `kre-sidecar`."""
    try:
        settings = SidecarSettings.from_env()
    except SettingsError as exc:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        log.error("%s", exc)
        sys.exit(2)
    logs.configure(settings.log_level, settings.log_format, settings.node_name)
    try:
        _asyncio_run(run(settings))
    except RunnerError as exc:  # HttpPortUnavailable: nothing else was started yet
        log.error("%s", exc)
        sys.exit(1)
    # Stopped: the loop that handled signals is closed. A second SIGTERM while the
    # interpreter winds down (a compression thread to join) ends it at once, still with 0.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _leave)


def _leave(signum: int, frame: object) -> None:
    os._exit(0)


def _asyncio_run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)
