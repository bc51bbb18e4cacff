"""Exec probe for Kubernetes: is the handler host SERVING on its Unix socket?

kubelet's native gRPC probe dials the pod IP, which would make the handler host listen
on a network interface; this CLI dials the socket from inside the container instead:

    python -m handler_host.probe --address unix:///var/run/kre/handler.sock

Exit 0 when grpc.health.v1 Check for service "" answers SERVING, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.contract import DEFAULT_HANDLER_ADDRESS as DEFAULT_ADDRESS


def check(address: str, timeout: float) -> tuple[bool, str]:
    """Ask the health service at ``address``; return (serving, what to print)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as exc:
            return False, f"no handler host answering at {address}: {exc.code().name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{address}: {status}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m handler_host.probe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("KRT_HANDLER_ADDRESS") or DEFAULT_ADDRESS,
        help=f"gRPC address (default: $KRT_HANDLER_ADDRESS, else {DEFAULT_ADDRESS})",
    )
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default: 3)")
    args = parser.parse_args(argv)
    serving, message = check(args.address, args.timeout)
    print(message, file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
