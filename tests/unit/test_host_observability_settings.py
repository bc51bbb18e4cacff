"""The handler host's logging and metrics variables, and the CLI's pure helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import any_pb2, struct_pb2, wrappers_pb2

from handler_host import cli
from handler_host.errors import SettingsError
from handler_host.settings import HostSettings
from protos import runner_pb2

BASE = {"KRT_BASE_PATH": "/code", "KRT_HANDLER_PATH": "src/handler.py"}


def test_defaults_from_the_environment() -> None:
    settings = HostSettings.from_env(BASE)
    assert (settings.log_format, settings.metrics_host, settings.metrics_port) == (
        "text",
        "0.0.0.0",
        9090,
    )


def test_built_in_code_metrics_are_off() -> None:
    assert HostSettings(base_path="/code", handler_path="h.py").metrics_port == 0


def test_values_are_read() -> None:
    env = {
        **BASE,
        "KRT_LOG_FORMAT": "JSON",
        "KRT_METRICS_HOST": "127.0.0.1",
        "KRT_METRICS_PORT": "0",
    }
    settings = HostSettings.from_env(env)
    assert (settings.log_format, settings.metrics_host, settings.metrics_port) == (
        "json",
        "127.0.0.1",
        0,
    )


def test_invalid_values_are_all_listed() -> None:
    env = {**BASE, "KRT_LOG_FORMAT": "xml", "KRT_METRICS_PORT": "70000"}
    with pytest.raises(SettingsError) as raised:
        HostSettings.from_env(env)
    assert "KRT_LOG_FORMAT='xml', expected text or json" in str(raised.value)
    assert "KRT_METRICS_PORT='70000'" in str(raised.value)


def test_cli_address_and_default_proto_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KRT_HANDLER_ADDRESS", raising=False)
    assert cli.resolve_address(None) == "unix:///var/run/kre/handler.sock"
    assert cli.resolve_address("/tmp/h.sock") == "unix:///tmp/h.sock"
    monkeypatch.setenv("KRT_HANDLER_ADDRESS", "127.0.0.1:5000")
    assert cli.resolve_address(None) == "127.0.0.1:5000"
    assert cli.default_proto_paths(BASE) == [str(Path("/code/src"))]
    assert cli.default_proto_paths({"KRT_BASE_PATH": "/code"}) == ["/code"]
    assert cli.default_proto_paths({}) == []


def test_cli_message_types_by_module_or_proto_name() -> None:
    assert cli.message_class("google.protobuf.wrappers_pb2.StringValue", []) is (
        wrappers_pb2.StringValue
    )
    assert cli.message_class("google.protobuf.Struct", []) is struct_pb2.Struct
    assert cli.message_class("type.googleapis.com/google.protobuf.Int64Value", []) is (
        wrappers_pb2.Int64Value
    )
    with pytest.raises(cli.UsageError, match="no such message type"):
        cli.message_class("google.protobuf.NoSuchThing", [])


def test_cli_reply_document() -> None:
    reply = runner_pb2.HandleReply()
    reply.result.failure.type = "RetryableError"
    reply.result.failure.retryable = True
    reply.early_replies.add().Pack(wrappers_pb2.Int32Value(value=7))

    document = cli.reply_to_json(reply, [])

    assert document["outcome"] == "retryable"
    assert document["early_replies"] == [
        {"@type": "type.googleapis.com/google.protobuf.Int32Value", "value": 7}
    ]
    assert document["failure"]["retryable"] is True
    unknown = any_pb2.Any(type_url="x/y.Z", value=b"\xff")
    assert cli.any_to_json(unknown, []) == {"@type": "x/y.Z", "value_base64": "/w=="}
