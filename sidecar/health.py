"""Following the handler host's health: grpc.health.v1 `Watch`, watched again when it ends.

The host reports NOT_SERVING until the user's `init(ctx)` has returned and again from the
moment it starts shutting down; the sidecar fetches from NATS only while it is SERVING.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.contract import SERVICE_NAME

log = logging.getLogger(__name__)

MIN_BACKOFF = 0.05
MAX_BACKOFF = 2.0

# Called with (serving, why): each status the host reports, and (False, why) when the
# watch ends or fails.
StatusCallback = Callable[[bool, str], None]

_SERVING = health_pb2.HealthCheckResponse.SERVING


async def follow_health(
    channel: grpc.aio.Channel, on_status: StatusCallback, service: str = SERVICE_NAME
) -> None:
    """Watch `service`'s status on `channel` until cancelled.

    After the watch ends or fails it is started again: at once when the host had
    answered (it went away, or restarts), after a delay that doubles up to MAX_BACKOFF
    while it cannot be reached.
    """
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=service)
    delay = MIN_BACKOFF
    while True:
        heard = False
        try:
            async for reply in stub.Watch(request):
                heard = True
                on_status(reply.status == _SERVING, status_name(reply.status))
            why = "the health watch ended"
        except grpc.aio.AioRpcError as exc:
            why = rpc_reason(exc)
        except Exception as exc:  # a bug (ours or grpc's): say it, and watch again
            log.exception("the health watch of the handler host failed")
            why = unexpected_reason(exc)
        on_status(False, why)
        delay = MIN_BACKOFF if heard else min(delay * 2, MAX_BACKOFF)
        await asyncio.sleep(delay)


def status_name(status: int) -> str:
    try:
        name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    except ValueError:  # a status newer than this grpc_health
        return f"status {status}"
    return name


def rpc_reason(exc: grpc.aio.AioRpcError) -> str:
    """A failed call, for a log line and /readyz: `CODE: details`."""
    return f"{exc.code().name}: {exc.details()}"


def unexpected_reason(exc: BaseException) -> str:
    return f"INTERNAL: {type(exc).__name__}: {exc}"
