"""The gRPC side: the ``kre.runner.v1.HandlerHost`` servicer, health, and the server.

Health reports NOT_SERVING from the start until ``set_serving()`` (called once
``init(ctx)`` has returned) and again from the moment ``stop()`` begins.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
from google.protobuf import any_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from handler_host.context import Context
from handler_host.dispatch import Dispatcher
from handler_host.errors import BindError
from handler_host.loader import UserCode
from handler_host.logs import with_call_metadata
from handler_host.metrics import DeliveryMetrics
from handler_host.process import ProcessStream
from handler_host.settings import HostSettings, is_loopback_address
from handler_host.timing import TimingRecorder
from protos import runner_pb2, runner_pb2_grpc
from protos.contract import BATCH_BYTES, SERVICE_NAME

logger = logging.getLogger(__name__)

HEALTH_SERVICES = ("", SERVICE_NAME)
USER_THREAD_PREFIX = "kre-handler"  # the threads that run sync user code
# Whoever can connect to the socket can run the handler: the owner and the group only.
# The sidecar shares the group (the pod's fsGroup), not necessarily the user.
SOCKET_MODE = 0o660
SOCKET_FOLDER_MODE = 0o770


class HandlerHostServicer(runner_pb2_grpc.HandlerHostServicer):
    """Both RPCs go through the same ``Dispatcher.dispatch``.

    It counts the calls in progress, so that shutdown can stop the server as soon as
    they are done instead of waiting out the grace period for long-lived calls that
    are not ours (a client's health Watch).
    """

    def __init__(self, dispatcher: Dispatcher, max_message_bytes: int = BATCH_BYTES) -> None:
        self._dispatcher = dispatcher
        self._max_batch_bytes = min(BATCH_BYTES, max_message_bytes)
        self._streams: set[ProcessStream] = set()
        self._draining = False
        self._calls = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def Handle(  # the RPC's name, as generated
        self, request: runner_pb2.Delivery, context: grpc.aio.ServicerContext
    ) -> runner_pb2.HandleReply:
        early_replies: list[any_pb2.Any] = []

        async def collect(payload: any_pb2.Any) -> None:
            early_replies.append(payload)

        with self._call():
            await self._refuse_when_draining(context)
            request = with_call_metadata(request, context.invocation_metadata())
            result = await self._dispatcher.dispatch(request, collect)
        return runner_pb2.HandleReply(early_replies=early_replies, result=result)

    async def Process(
        self,
        request_iterator: AsyncIterator[runner_pb2.Delivery],
        context: grpc.aio.ServicerContext,
    ) -> None:
        await self._stream(request_iterator, context, batched=False)

    async def ProcessBatch(
        self,
        request_iterator: AsyncIterator[runner_pb2.DeliveryBatch],
        context: grpc.aio.ServicerContext,
    ) -> None:
        await self._stream(request_iterator, context, batched=True)

    async def _stream(
        self,
        requests: AsyncIterator[runner_pb2.Delivery] | AsyncIterator[runner_pb2.DeliveryBatch],
        context: grpc.aio.ServicerContext,
        *,
        batched: bool,
    ) -> None:
        with self._call():
            await self._refuse_when_draining(context)
            # Headers at once: the sidecar knows the host took the stream (a host
            # without ProcessBatch answers UNIMPLEMENTED instead).
            await context.send_initial_metadata(())
            stream = ProcessStream(
                self._dispatcher, context, batched=batched, max_batch_bytes=self._max_batch_bytes
            )
            self._streams.add(stream)
            try:
                await stream.run(requests)
            finally:
                self._streams.discard(stream)

    def drain(self) -> None:
        """Shutdown has begun: refuse new calls, end each Process stream once its
        deliveries are done."""
        self._draining = True
        for stream in list(self._streams):
            stream.drain()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no Handle or Process call is in progress; False if time ran out."""
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @contextmanager
    def _call(self) -> Iterator[None]:
        self._calls += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._calls -= 1
            if not self._calls:
                self._idle.set()

    async def _refuse_when_draining(self, context: grpc.aio.ServicerContext) -> None:
        if self._draining:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "the handler host is shutting down: try later"
            )


class HostServer:
    """A started handler-host gRPC server. Build it with ``start_server``."""

    def __init__(
        self,
        server: grpc.aio.Server,
        servicer: HandlerHostServicer,
        health: health_aio.HealthServicer,
        dispatcher: Dispatcher,
        executor: ThreadPoolExecutor,
        address: str,
        port: int,
    ) -> None:
        self.server = server
        self.servicer = servicer
        self.health = health
        self.dispatcher = dispatcher
        self.address = address
        self.port = port  # the bound TCP port; 0 for a Unix socket
        self._executor = executor
        self._stopped = False

    @property
    def target(self) -> str:
        """What a client passes to ``grpc.aio.insecure_channel`` to reach this server."""
        if self.address.startswith("unix"):
            return self.address
        return f"{self.address.rpartition(':')[0]}:{self.port}"

    async def run_init(self) -> None:
        """Run the user's ``init(ctx)``; raises InitError."""
        await self.dispatcher.run_init()

    async def set_serving(self) -> None:
        for service in HEALTH_SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        logger.info("health: SERVING")

    async def set_not_serving(self) -> None:
        for service in HEALTH_SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        logger.info("health: NOT_SERVING")

    async def stop(self, grace: float | None) -> None:
        """NOT_SERVING, let in-flight calls finish within ``grace`` seconds, then stop.

        New Handle and Process calls are refused (UNAVAILABLE) and a Process stream
        ends as soon as its deliveries are answered, without waiting for the client to
        close it. The server stops once no Handle or Process call is left (a client's
        health Watch does not hold it), at the latest after ``grace``. Idempotent.
        """
        if self._stopped:
            return
        self._stopped = True
        # Drain first: once a client sees NOT_SERVING, no new delivery will be run.
        self.servicer.drain()
        await self.health.enter_graceful_shutdown()
        logger.info("health: NOT_SERVING; finishing calls in progress, grace %s s", grace)
        if not await self.servicer.wait_idle(grace or 0):
            logger.warning("grace period over with calls in progress: they are cancelled")
        await self.server.stop(0)
        busy = self.dispatcher.sync_calls_pending
        if busy:
            logger.warning("%d sync handler call(s) still running after the grace period", busy)
        self._executor.shutdown(wait=False, cancel_futures=True)
        await self.dispatcher.context.aclose()
        logger.info("gRPC server stopped")

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def start_server(settings: HostSettings, user_code: UserCode, context: Context) -> HostServer:
    """Bind ``settings.handler_address`` and start serving, health NOT_SERVING.

    For a Unix socket the parent folder is created (owner and group only) and a stale
    socket file removed; the socket is for the owner and the group only. A TCP address
    may use port 0 (tests): ``HostServer.port`` is the bound port. One that is not
    loopback (KRT_HANDLER_ALLOW_PUBLIC=true) is said in a warning.
    """
    executor = ThreadPoolExecutor(
        max_workers=settings.handler_threads, thread_name_prefix=USER_THREAD_PREFIX
    )
    dispatcher = Dispatcher(
        user_code,
        context,
        executor,
        timeout=settings.handler_timeout,
        max_message_bytes=settings.grpc_max_message_bytes,
        threads=settings.handler_threads,
        observers=(DeliveryMetrics(), TimingRecorder(context)),
    )
    servicer = HandlerHostServicer(dispatcher, settings.grpc_max_message_bytes)
    health = health_aio.HealthServicer()
    for service in HEALTH_SERVICES:
        await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    limit = settings.grpc_max_message_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
        ]
    )
    runner_pb2_grpc.add_HandlerHostServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    _enable_reflection(server)

    address = settings.handler_address
    try:
        socket_path = _prepare_unix_socket(address)
        port = server.add_insecure_port(address)
        if socket_path is not None:
            # Made by the bind with the umask's mode; nothing is served before start().
            os.chmod(socket_path, SOCKET_MODE)
    except (OSError, RuntimeError) as exc:
        executor.shutdown(wait=False)
        raise BindError(address, str(exc)) from exc
    await server.start()
    if address.startswith("unix"):
        port = 0  # add_insecure_port answers 1 for a Unix socket
    logger.info("gRPC server listening on %s, health NOT_SERVING", address)
    if not is_loopback_address(address):
        logger.warning(
            "KRT_HANDLER_ALLOW_PUBLIC=true: the handler host listens on %s, beyond this "
            "machine, with no authentication or TLS: whoever reaches that port can run the "
            "handler on any input and read its answers; allow only the sidecar to it "
            "(a NetworkPolicy), or use a Unix socket",
            address,
        )
    return HostServer(server, servicer, health, dispatcher, executor, address, port)


def _prepare_unix_socket(address: str) -> Path | None:
    """The socket file's path, its folder made when missing; None for another address.

    A folder made here gets SOCKET_FOLDER_MODE whatever the umask. An existing folder
    is left as it is: it may be shared (/tmp) or not ours to change (the kubelet's
    emptyDir), and the socket's own mode is what keeps others from connecting.
    """
    if not address.startswith("unix:"):
        return None
    path = Path(address.removeprefix("unix:").removeprefix("//"))
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Under a setgid folder (the emptyDir with fsGroup) the new one is setgid too, so
        # the socket gets the shared group: keep that bit.
        inherited = path.parent.stat().st_mode & stat.S_ISGID
        os.chmod(path.parent, SOCKET_FOLDER_MODE | inherited)
    if path.is_socket():
        # Left by a previous run of this container: binding would fail with "in use".
        logger.info("removing stale socket file %s", path)
        os.unlink(path)
    return path


def _enable_reflection(server: grpc.aio.Server) -> None:
    try:
        from grpc_reflection.v1alpha import reflection
    except ImportError:  # an optional extra: grpcurl then needs the .proto files
        logger.debug("grpc_reflection not installed: server reflection is off")
        return
    names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
    reflection.enable_server_reflection((*names, reflection.SERVICE_NAME), server)
