"""``kre-handler-host`` as a real process: clear start failures, clean SIGTERM stop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from handler_host.context import pack_any
from protos import kre_nats_msg_pb2, runner_pb2, runner_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
CONSOLE_SCRIPT = Path(sys.executable).parent / "kre-handler-host"
START_TIMEOUT_S = 60


def command() -> list[str]:
    if CONSOLE_SCRIPT.exists():
        return [str(CONSOLE_SCRIPT)]
    return [sys.executable, "-m", "handler_host.main"]


def host_env(tmp_path: Path, **krt: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRT_")}
    env["KRT_HANDLER_ADDRESS"] = f"unix://{tmp_path}/run/handler.sock"
    env.update(krt)
    return env


def run_host(tmp_path: Path, **krt: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(),
        env=host_env(tmp_path, **krt),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )


def write_handler(tmp_path: Path, code: str) -> dict[str, str]:
    (tmp_path / "src").mkdir(exist_ok=True)
    (tmp_path / "src" / "handler.py").write_text(textwrap.dedent(code))
    return {"KRT_BASE_PATH": str(tmp_path), "KRT_HANDLER_PATH": "src/handler.py"}


def test_missing_variables_exit_2_and_are_all_named(tmp_path: Path) -> None:
    done = run_host(tmp_path, KRT_HANDLER_THREADS="zero")

    assert done.returncode == 2, done.stderr
    assert "missing (set them): KRT_BASE_PATH, KRT_HANDLER_PATH" in done.stderr
    assert "KRT_HANDLER_THREADS='zero'" in done.stderr


def test_invalid_data_service_variable_exits_2(tmp_path: Path) -> None:
    krt = write_handler(tmp_path, "def handler(ctx, data):\n    return None\n")

    done = run_host(tmp_path, KRT_INFLUX_URI="influx-without-scheme", **krt)

    assert done.returncode == 2, done.stderr
    assert "KRT_INFLUX_URI='influx-without-scheme'" in done.stderr


def test_missing_handler_file_exits_1(tmp_path: Path) -> None:
    done = run_host(tmp_path, KRT_BASE_PATH=str(tmp_path), KRT_HANDLER_PATH="src/nope.py")

    assert done.returncode == 1, done.stderr
    assert str(tmp_path / "src" / "nope.py") in done.stderr
    assert "does not exist" in done.stderr
    assert "KRT_HANDLER_PATH='src/nope.py'" in done.stderr


def test_module_raising_on_import_exits_1_with_its_traceback(tmp_path: Path) -> None:
    krt = write_handler(
        tmp_path,
        """
        import json
        CONFIG = json.loads("{not json")

        def handler(ctx, data):
            return None
        """,
    )

    done = run_host(tmp_path, **krt)

    assert done.returncode == 1, done.stderr
    assert "raised JSONDecodeError while being imported" in done.stderr
    assert "Traceback (most recent call last)" in done.stderr
    assert 'handler.py", line 3, in <module>' in done.stderr


def test_no_handler_exits_1(tmp_path: Path) -> None:
    done = run_host(tmp_path, **write_handler(tmp_path, "def init(ctx):\n    pass\n"))

    assert done.returncode == 1, done.stderr
    assert "does not define handler" in done.stderr


def test_init_raising_exits_1_and_says_so(tmp_path: Path) -> None:
    krt = write_handler(
        tmp_path,
        """
        def init(ctx):
            with open(ctx.path("data/model.bin"), "rb") as f:
                f.read()

        def handler(ctx, data):
            return None
        """,
    )

    done = run_host(tmp_path, **krt)

    assert done.returncode == 1, done.stderr
    assert "init(ctx)" in done.stderr
    assert "raised FileNotFoundError" in done.stderr
    assert "data/model.bin" in done.stderr
    assert "health: SERVING" not in done.stderr


async def wait_serving(channel: grpc.aio.Channel) -> None:
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=START_TIMEOUT_S
    )
    async for reply in watch:
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            watch.cancel()
            return


def serving(
    cmd: list[str], env: dict[str, str], cwd: Path, stderr_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """A host process, its address and its stderr's file; killed at the end if still up."""
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stderr=stderr)
    try:
        yield proc, env["KRT_HANDLER_ADDRESS"], stderr_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def greeter(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """The greeter example served by a real kre-handler-host on a Unix socket."""
    env = host_env(
        tmp_path,
        KRT_BASE_PATH=str(ROOT / "examples" / "greeter"),
        KRT_HANDLER_PATH="handler.py",
        KRT_NODE_NAME="greeter",
        KRT_SHUTDOWN_GRACE="10",
        KRT_MONGO_URI="mongodb://kre:s3cr3t-pw@127.0.0.1:9/kre",
    )
    yield from serving(command(), env, tmp_path, tmp_path / "stderr.log")


async def test_serves_the_greeter_then_stops_on_sigterm(
    greeter: tuple[subprocess.Popen[bytes], str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    proc, address, stderr_path = greeter
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "greeter"))
    from public_input_pb2 import Request, Response

    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(wait_serving(channel), START_TIMEOUT_S)
        message = kre_nats_msg_pb2.KreNatsMessage(
            tracking_id="t-1", payload=pack_any(Request(name="Ada"))
        )
        reply = await runner_pb2_grpc.HandlerHostStub(channel).Handle(
            runner_pb2.Delivery(id=1, message=message), timeout=30
        )
    response = Response()
    assert reply.result.payload.Unpack(response)
    assert response.greeting.endswith(", Ada!")

    proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(proc.wait, 30)

    log = stderr_path.read_text()
    assert code == 0, log
    for step in ("settings:", "health: SERVING", "received SIGTERM", "handler host stopped"):
        assert step in log
    assert "[node=greeter tracking_id=t-1] greeting one visitor" in log
    assert "mongodb://kre:***@127.0.0.1:9/kre" in log
    assert "s3cr3t-pw" not in log


@pytest.fixture
def sleeping_host(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """A host on plain asyncio (uvloop blocked) whose sync handler sleeps 5 s per call."""
    krt = write_handler(
        tmp_path,
        """
        import sys, time

        def handler(ctx, data):
            print("handler sleeping", file=sys.stderr, flush=True)
            time.sleep(5)
        """,
    )
    env = host_env(tmp_path, KRT_SHUTDOWN_GRACE="0.2", KRT_METRICS_PORT="0", **krt)
    no_uvloop = "import sys; sys.modules['uvloop'] = None; import handler_host.main as m; m.main()"
    yield from serving([sys.executable, "-c", no_uvloop], env, ROOT, tmp_path / "stderr.log")


async def test_a_second_sigterm_while_stopping_still_exits_0(
    sleeping_host: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    # The grace period ends with the handler's thread still sleeping: after its loop has
    # closed, the host waits up to a second for the thread. A second SIGTERM then (plain
    # asyncio leaves SIGTERM's default action) ends it at once, still with 0.
    proc, address, stderr_path = sleeping_host
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(wait_serving(channel), START_TIMEOUT_S)
        call = runner_pb2_grpc.HandlerHostStub(channel).Handle(
            runner_pb2.Delivery(id=1, message=kre_nats_msg_pb2.KreNatsMessage()), timeout=30
        )
        await log_says(stderr_path, "handler sleeping")
        proc.send_signal(signal.SIGTERM)
        await log_says(stderr_path, "handler host stopped")
        proc.send_signal(signal.SIGTERM)  # while the sleeping thread is waited for
        code = await asyncio.to_thread(proc.wait, 30)
        call.cancel()
    assert code == 0, stderr_path.read_text()  # at once, with the stop's own code


async def log_says(path: Path, text: str) -> None:
    def seen() -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while text not in path.read_text():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the log: {path.read_text()}")
            time.sleep(0.005)

    await asyncio.to_thread(seen)


def test_a_thread_init_leaves_running_does_not_hold_the_exit(tmp_path: Path) -> None:
    # A non-daemon thread of the user's own, then init fails: Python would wait for the
    # thread at exit, forever. The host waits a second, says so, and exits 1.
    krt = write_handler(
        tmp_path,
        """
        import threading, time

        def init(ctx):
            threading.Thread(target=time.sleep, args=(3600,), name="users-own").start()
            raise RuntimeError("no model")

        def handler(ctx, data):
            return data
        """,
    )

    done = run_host(tmp_path, **krt)

    assert done.returncode == 1, done.stderr
    assert "raised RuntimeError: no model" in done.stderr
    assert "exiting with 1 user-code thread(s) still running: users-own" in done.stderr
