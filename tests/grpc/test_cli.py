"""``kre-handler-host call`` as a real process against a handler host served in-process.

The CLI runs as a subprocess: it imports the user's _pb2 modules and compiles .proto
files into protobuf's process-wide descriptor pool, which must not be this one's.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from handler_host.cli import EXIT_FAILED, EXIT_RETRYABLE, EXIT_UNREACHABLE, EXIT_USAGE
from handler_host.testing import HandlerNode, serve_node

ROOT = Path(__file__).resolve().parents[2]
GREETER = ROOT / "examples" / "greeter"
CONSOLE_SCRIPT = Path(sys.executable).parent / "kre-handler-host"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

ECHO = """
from google.protobuf import any_pb2, wrappers_pb2
from handler_host import RetryableError

async def handler(ctx, data):
    text = wrappers_pb2.StringValue()
    data.Unpack(text)
    match text.value:
        case "retry":
            raise RetryableError("database busy")
        case "none":
            return None
        case "early":
            await ctx.early_reply(wrappers_pb2.StringValue(value="early answer"))
        case "opaque":
            return any_pb2.Any(type_url="type.googleapis.com/not.Known", value=b"\\x01\\x02")
    return wrappers_pb2.StringValue(value=f"{ctx.tracking_id}:{text.value}")
"""


@dataclass
class Done:
    code: int
    stdout: str
    stderr: str

    @property
    def document(self) -> dict[str, object]:
        return json.loads(self.stdout)


async def run_cli(*args: str, cwd: Path = ROOT, **env: str) -> Done:
    command = (
        [str(CONSOLE_SCRIPT)]
        if CONSOLE_SCRIPT.exists()
        else [sys.executable, "-m", "handler_host.main"]
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("KRT_")}
    proc = await asyncio.create_subprocess_exec(
        *command,
        "call",
        *args,
        cwd=cwd,
        env={**base, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Done(proc.returncode, stdout.decode(), stderr.decode())


@pytest.fixture
async def greeter() -> AsyncIterator[HandlerNode]:
    async with serve_node(GREETER / "handler.py") as node:
        yield node


@pytest.fixture
async def echo(tmp_path: Path) -> AsyncIterator[HandlerNode]:
    (tmp_path / "handler.py").write_text(textwrap.dedent(ECHO))
    async with serve_node(tmp_path / "handler.py", address=f"unix://{tmp_path}/h.sock") as node:
        yield node


async def test_call_with_a_pb2_module_type(greeter: HandlerNode) -> None:
    done = await run_cli(
        "--address", greeter.host.target,
        "--proto-path", str(GREETER),
        "--type", "public_input_pb2.Request",
        "--json", '{"name": "Ada"}',
        "--tracking-id", "t-1",
        "--header", f"traceparent={TRACEPARENT}",
    )  # fmt: skip

    assert done.code == 0, done.stderr
    document = done.document
    assert document["outcome"] == "payload"
    assert document["payload"] == {
        "@type": "type.googleapis.com/greeter.Response",
        "greeting": "Hello, Ada!",
    }
    assert document["early_replies"] == []
    assert document["tracking_id"] == "t-1"
    assert isinstance(document["duration_ms"], float)


async def test_full_proto_name_and_defaults_from_the_environment(greeter: HandlerNode) -> None:
    # In the handler container: KRT_HANDLER_ADDRESS and the handler's folder are known.
    done = await run_cli(
        "--type", "greeter.Request", "--json", '{"name": "Grace"}',
        KRT_HANDLER_ADDRESS=greeter.host.target,
        KRT_BASE_PATH=str(GREETER.parent),
        KRT_HANDLER_PATH="greeter/handler.py",
    )  # fmt: skip

    assert done.code == 0, done.stderr
    assert done.document["payload"]["greeting"] == "Hello, Grace!"  # type: ignore[index]


async def test_proto_file_compiled_at_run_time(greeter: HandlerNode, tmp_path: Path) -> None:
    (tmp_path / "request.json").write_text('{"name": "Linus"}')
    done = await run_cli(
        "--address", greeter.host.target,
        "--proto", str(GREETER / "public_input.proto"),
        "--type", "greeter.Request",
        "--json", f"@{tmp_path / 'request.json'}",
        cwd=tmp_path,
    )  # fmt: skip

    assert done.code == 0, done.stderr
    assert done.document["payload"]["greeting"] == "Hello, Linus!"  # type: ignore[index]


async def test_handler_failure_exits_1_with_the_traceback(greeter: HandlerNode) -> None:
    done = await run_cli(
        "--address", greeter.host.target, "--proto-path", str(GREETER),
        "--type", "greeter.Request", "--json", "{}",
    )  # fmt: skip

    assert done.code == EXIT_FAILED
    failure = done.document["failure"]
    assert failure["type"] == "ValueError"  # type: ignore[index]
    assert failure["retryable"] is False  # type: ignore[index]
    assert "Request.name is empty" in failure["message"]  # type: ignore[index]
    assert "raise ValueError" in done.stderr  # for the human reading the terminal


async def test_outcomes_over_a_unix_socket(echo: HandlerNode) -> None:
    def args(value: str) -> list[str]:
        return [
            "--address", echo.host.target,
            "--type", "google.protobuf.StringValue",
            "--json", json.dumps(value),
        ]  # fmt: skip

    retry, none, early, opaque = await asyncio.gather(
        run_cli(*args("retry")),
        run_cli(*args("none")),
        run_cli(*args("early"), "--tracking-id", "t-9"),
        run_cli(*args("opaque")),
    )

    assert retry.code == EXIT_RETRYABLE
    assert retry.document["outcome"] == "retryable"
    assert none.code == 0
    assert none.document["outcome"] == "none"
    assert "payload" not in none.document
    assert early.code == 0
    assert early.document["early_replies"] == [
        {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "early answer"}
    ]
    assert early.document["payload"]["value"] == "t-9:early"  # type: ignore[index]
    assert opaque.document["payload"] == {
        "@type": "type.googleapis.com/not.Known",
        "value_base64": "AQI=",
    }


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--type", "nope.Missing"], "no such message type"),
        (["--type", "google.protobuf.StringValue", "--json", "{not json"], "not a valid"),
        (["--type", "google.protobuf.StringValue", "--json", "@/nonexistent.json"], "--json"),
        (["--type", "google.protobuf.Empty", "--header", "novalue"], "KEY=VALUE"),
        (["--type", "x.Y", "--proto", "/nonexistent.proto"], "no such file"),
        (["--json", "{}"], "--type"),
    ],
)
async def test_usage_errors_exit_2(args: list[str], expected: str) -> None:
    done = await run_cli("--address", "127.0.0.1:1", *args)

    assert done.code == EXIT_USAGE, done.stderr
    assert expected in done.stderr
    assert done.stdout == ""


async def test_unreachable_host_exits_4(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tcp, unix = await asyncio.gather(
        run_cli("--address", f"127.0.0.1:{port}", "--connect-timeout", "1",
                "--type", "google.protobuf.Empty"),
        run_cli("--connect-timeout", "1", "--type", "google.protobuf.Empty",
                KRT_HANDLER_ADDRESS=f"unix://{tmp_path}/absent.sock"),
    )  # fmt: skip

    for done in (tcp, unix):
        assert done.code == EXIT_UNREACHABLE, done.stderr
        assert "no handler host answers" in done.stderr
    assert f"unix://{tmp_path}/absent.sock" in unix.stderr
