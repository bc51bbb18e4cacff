"""``kre-handler-host call``: send one message to a running handler host, print the reply.

    kre-handler-host call --type public_input_pb2.Request --json '{"name": "Ada"}'
    kre-handler-host call --type greeter.Request --json @request.json \\
        --address 127.0.0.1:50051 --proto-path examples/greeter
    kre-handler-host call --proto examples/greeter/public_input.proto \\
        --type greeter.Request --json '{"name": "Ada"}' --tracking-id t-1

The payload is built from JSON (protobuf's JSON mapping) as the named message type,
sent through the unary ``Handle`` RPC, and the reply printed as one JSON document on
stdout: ``outcome`` (payload, none, failure, retryable), ``early_replies``, then
``payload`` or ``failure``, ``start``, ``end``, ``duration_ms``. An ``Any`` is printed
as protobuf's JSON for it (``{"@type": ..., fields}``) when its type can be imported,
else as ``{"@type": ..., "value_base64": ...}``.

Exit codes: 0 the handler returned a message or None; 1 it raised; 3 it raised a
RetryableError; 2 usage error (bad option, JSON or type); 4 no answer from the host
(unreachable, timed out, refused the call).
"""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

# Imported for their types: google.protobuf.StringValue, Struct... resolve by name.
from google.protobuf import (  # noqa: F401
    any_pb2,
    descriptor_pool,
    duration_pb2,
    empty_pb2,
    json_format,
    message_factory,
    struct_pb2,
    timestamp_pb2,
    wrappers_pb2,
)
from google.protobuf.message import Message

from handler_host.context import pack_any
from handler_host.settings import DEFAULT_ADDRESS, DEFAULT_MAX_MESSAGE_BYTES
from protos import kre_nats_msg_pb2, runner_pb2, runner_pb2_grpc

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_RETRYABLE = 3
EXIT_UNREACHABLE = 4

_TYPE_URL_PREFIX = "type.googleapis.com/"
_scanned: set[Path] = set()  # folders whose _pb2 modules were imported


class UsageError(Exception):
    """Something the caller must fix in the command line; exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (without the program name) and run the subcommand."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        from handler_host.main import main as serve

        serve([])
    try:
        with tempfile.TemporaryDirectory(prefix="kre-call-") as tmp:
            return call(args, Path(tmp))
    except UsageError as exc:
        parser.exit(EXIT_USAGE, f"kre-handler-host call: error: {exc}\n")
    except HostUnreachable as exc:
        parser.exit(EXIT_UNREACHABLE, f"kre-handler-host call: {exc}\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kre-handler-host",
        description="Without arguments: serve the handler (KRT_* variables).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="serve the handler (the same as no arguments)")
    call_parser = commands.add_parser(
        "call",
        help="send one message to a running handler host and print the reply",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = call_parser.add_argument
    add("--type", required=True, help="message type: public_input_pb2.Request or greeter.Request")
    add("--json", default="{}", help="the payload as JSON, @FILE to read it, - for stdin")
    add("--address", default=None, help="unix:///path.sock or HOST:PORT ($KRT_HANDLER_ADDRESS)")
    add(
        "--proto-path",
        action="append",
        default=None,
        metavar="DIR",
        help="folder of the _pb2 modules (and of .proto imports); repeatable; "
        "default: the handler's folder from KRT_BASE_PATH/KRT_HANDLER_PATH",
    )
    add(
        "--proto", action="append", default=[], metavar="FILE", help=".proto to compile; repeatable"
    )
    add("--tracking-id", default=None, help="the input envelope's tracking id (cli-<random>)")
    add("--header", action="append", default=[], metavar="KEY=VALUE", help="a Delivery header")
    add("--attempt", type=int, default=1, help="the delivery attempt (default 1)")
    add("--timeout", type=float, default=None, help="seconds for the handler to answer")
    add("--connect-timeout", type=float, default=5.0, help="seconds to reach the host")
    return parser


class HostUnreachable(Exception):
    """No answer from the handler host; exit code 4."""


def call(args: argparse.Namespace, tmp: Path) -> int:
    """Build the Delivery, call Handle, print the reply; return the exit code."""
    paths = [Path(p) for p in (args.proto_path or default_proto_paths(os.environ))]
    with _on_sys_path([tmp, *paths]):
        for proto in args.proto:
            compile_proto(Path(proto), paths, tmp)
        payload = parse_payload(message_class(args.type, paths), read_json(args.json))
        tracking_id = args.tracking_id or f"cli-{uuid.uuid4().hex[:12]}"
        delivery = build_delivery(payload, tracking_id, args.attempt, args.header)
        reply = send(resolve_address(args.address), delivery, args.timeout, args.connect_timeout)
        document = reply_to_json(reply, paths)
    document["tracking_id"] = tracking_id
    print(json.dumps(document, indent=2, ensure_ascii=False))
    failure = document.get("failure")
    if failure is not None and failure.get("traceback"):
        print(failure["traceback"], file=sys.stderr, end="")
    return {"failure": EXIT_FAILED, "retryable": EXIT_RETRYABLE}.get(document["outcome"], EXIT_OK)


def default_proto_paths(env: os._Environ[str] | dict[str, str]) -> list[str]:
    """The handler's folder, when KRT_BASE_PATH and KRT_HANDLER_PATH say where it is."""
    base, handler = env.get("KRT_BASE_PATH", ""), env.get("KRT_HANDLER_PATH", "")
    if not base:
        return []
    return [str((Path(base) / handler).parent) if handler else base]


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("KRT_HANDLER_ADDRESS", "").strip() or DEFAULT_ADDRESS
    if address.startswith("/"):  # a bare socket path
        return f"unix://{address}"
    return address


def compile_proto(proto: Path, includes: Sequence[Path], out: Path) -> None:
    """Compile ``proto`` with grpc_tools.protoc into ``out`` and import the module."""
    try:
        from grpc_tools import protoc  # type: ignore[import-untyped]
    except ImportError:
        raise UsageError("--proto needs grpcio-tools: pip install grpcio-tools") from None
    if not proto.is_file():
        raise UsageError(f"--proto {str(proto)!r}: no such file")
    well_known = Path(protoc.__file__).parent / "_proto"
    folders = [proto.resolve().parent, *(p.resolve() for p in includes), well_known]
    command = ["protoc", *(f"-I{folder}" for folder in folders), f"--python_out={out}"]
    if protoc.main([*command, str(proto.resolve())]) != 0:
        raise UsageError(f"protoc could not compile {str(proto)!r} (its errors are above)")
    _import(proto.stem + "_pb2")


def message_class(type_name: str, paths: Sequence[Path]) -> type[Message]:
    """The class for ``module.Class`` (a _pb2 module on the path) or a full proto name."""
    name = type_name.removeprefix(_TYPE_URL_PREFIX)
    found = _from_module(name) or _from_pool(name)
    if found is None:
        import_pb2_modules(paths)
        found = _from_pool(name)
    if found is None:
        where = ", ".join(str(p) for p in paths) or "no --proto-path"
        raise UsageError(
            f"--type {type_name!r}: no such message type (looked in the _pb2 modules of "
            f"{where}); write it as module.Message or as the full proto name"
        )
    return found


def _from_module(name: str) -> type[Message] | None:
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            target: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            target = getattr(target, attr, None)
        if isinstance(target, type) and issubclass(target, Message):
            return target
    return None


def _from_pool(name: str) -> type[Message] | None:
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(name)
    except KeyError:
        return None
    return message_factory.GetMessageClass(descriptor)


def import_pb2_modules(paths: Sequence[Path]) -> None:
    """Import every ``*_pb2.py`` of ``paths``: their types join the descriptor pool."""
    for folder in paths:
        if folder in _scanned:
            continue
        _scanned.add(folder)
        for module in sorted(folder.glob("*_pb2.py")):
            try:
                _import(module.stem)
            except Exception as exc:  # one broken module must not hide the others
                print(f"note: cannot import {module}: {exc}", file=sys.stderr)


def _import(name: str) -> None:
    importlib.import_module(name)


def read_json(text: str) -> str:
    if text == "-":
        return sys.stdin.read()
    if text.startswith("@"):
        try:
            return Path(text[1:]).read_text()
        except OSError as exc:
            raise UsageError(f"--json {text!r}: {exc.strerror or exc}") from None
    return text


def parse_payload(cls: type[Message], text: str) -> Message:
    try:
        return json_format.Parse(text, cls())
    except json_format.ParseError as exc:
        raise UsageError(f"--json is not a valid {cls.DESCRIPTOR.full_name}: {exc}") from None


def build_delivery(
    payload: Message, tracking_id: str, attempt: int, headers: Sequence[str]
) -> runner_pb2.Delivery:
    message = kre_nats_msg_pb2.KreNatsMessage(tracking_id=tracking_id, payload=pack_any(payload))
    delivery = runner_pb2.Delivery(id=1, message=message, attempt=attempt)
    for header in headers:
        key, sep, value = header.partition("=")
        if not sep or not key:
            raise UsageError(f"--header {header!r}: expected KEY=VALUE")
        delivery.headers[key] = value
    return delivery


def send(
    address: str, delivery: runner_pb2.Delivery, timeout: float | None, connect_timeout: float
) -> runner_pb2.HandleReply:
    limit = DEFAULT_MAX_MESSAGE_BYTES
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    with grpc.insecure_channel(address, options=options) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            raise HostUnreachable(
                f"no handler host answers at {address} within {connect_timeout:g}s "
                "(--address, $KRT_HANDLER_ADDRESS)"
            ) from None
        stub = runner_pb2_grpc.HandlerHostStub(channel)
        try:
            reply: runner_pb2.HandleReply = stub.Handle(delivery, timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            name = code.name if code is not None else "error"
            raise HostUnreachable(f"Handle failed at {address}: {name}: {details}") from None
    return reply


def reply_to_json(reply: runner_pb2.HandleReply, paths: Sequence[Path]) -> dict[str, Any]:
    """The printed document (see the module docstring)."""
    result = reply.result
    kind = result.WhichOneof("outcome")
    document: dict[str, Any] = {"outcome": "none"}
    document["early_replies"] = [any_to_json(p, paths) for p in reply.early_replies]
    if kind == "payload":
        document["outcome"] = "payload"
        document["payload"] = any_to_json(result.payload, paths)
    elif kind == "failure":
        failure = result.failure
        document["outcome"] = "retryable" if failure.retryable else "failure"
        document["failure"] = json_format.MessageToDict(
            failure, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    document["start"] = result.start.ToJsonString()
    document["end"] = result.end.ToJsonString()
    nanos = result.end.ToNanoseconds() - result.start.ToNanoseconds()
    document["duration_ms"] = round(nanos / 1e6, 3)
    return document


def any_to_json(payload: any_pb2.Any, paths: Sequence[Path]) -> Any:
    """Protobuf's JSON for ``payload``; its type URL and base64 bytes if not importable."""
    name = payload.type_url.rpartition("/")[2]
    if _from_pool(name) is None:
        import_pb2_modules(paths)
    try:
        return json_format.MessageToDict(
            payload, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    except (TypeError, KeyError):
        value = base64.b64encode(payload.value).decode("ascii")
        return {"@type": payload.type_url, "value_base64": value}


@contextmanager
def _on_sys_path(folders: Sequence[Path]) -> Iterator[None]:
    saved = list(sys.path)
    sys.path[:0] = [str(folder) for folder in folders]
    try:
        yield
    finally:
        sys.path[:] = saved
