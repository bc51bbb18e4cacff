"""handler_host.probe against a real grpc.aio health server on a Unix socket."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from handler_host import probe

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def address(tmp_path: Path) -> str:
    return f"unix://{tmp_path}/handler.sock"


@pytest.fixture
async def servicer(address: str) -> AsyncIterator[health.aio.HealthServicer]:
    """The handler host's health service, alone, on the socket; starts NOT_SERVING."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    await servicer.set("", NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(address)
    await server.start()
    yield servicer
    await server.stop(grace=None)


async def run_probe(address: str) -> int:
    # The probe is synchronous: run it off the loop that serves the health service.
    return await asyncio.to_thread(probe.main, ["--address", address, "--timeout", "5"])


async def test_serving_exits_0(servicer, address, capsys) -> None:
    await servicer.set("", SERVING)
    assert await run_probe(address) == 0
    assert "SERVING" in capsys.readouterr().out


async def test_not_serving_exits_1(servicer, address, capsys) -> None:
    assert await run_probe(address) == 1
    assert f"{address}: NOT_SERVING" in capsys.readouterr().err


async def test_serving_then_shutdown_exits_1(servicer, address) -> None:
    await servicer.set("", SERVING)
    assert await run_probe(address) == 0
    await servicer.enter_graceful_shutdown()
    assert await run_probe(address) == 1


def test_no_server_exits_1_with_a_clear_message(address, capsys) -> None:
    assert probe.main(["--address", address, "--timeout", "2"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"no handler host answering at {address}: UNAVAILABLE"
    )


def test_address_defaults_to_krt_handler_address(address, monkeypatch, capsys) -> None:
    monkeypatch.setenv("KRT_HANDLER_ADDRESS", address)
    assert probe.main(["--timeout", "2"]) == 1
    assert address in capsys.readouterr().err


async def test_runs_as_python_dash_m_like_the_kubelet(servicer, address) -> None:
    await servicer.set("", SERVING)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "handler_host.probe",
        "--address",
        address,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == f"{address}: SERVING"
