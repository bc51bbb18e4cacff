"""Sidecar settings from the environment."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sidecar.errors import SettingsError
from sidecar.settings import (
    DEFAULT_HANDLER_ADDRESS,
    SidecarSettings,
    handler_endpoint,
    sanitize_durable,
)

BASE = {
    "KRT_NODE_NAME": "node-a",
    "KRT_NATS_SERVER": "nats://127.0.0.1:4222",
    "KRT_NATS_INPUT": "wf.node-a",
    "KRT_NATS_OUTPUT": "wf.node-b",
    "KRT_NATS_STREAM": "wf-stream",
}


def settings(**overrides: str) -> SidecarSettings:
    return SidecarSettings.from_env({**BASE, **overrides})


def test_defaults() -> None:
    s = settings()
    assert s.node_name == "node-a"
    assert s.nats_servers == ("nats://127.0.0.1:4222",)
    assert s.nats_inputs == ("wf.node-a",)
    assert s.nats_output == "wf.node-b"
    assert s.nats_stream == "wf-stream"
    assert s.entrypoint_subject == ""
    assert s.is_last_node is False
    assert s.durable == "node-a"
    assert s.handler_address == DEFAULT_HANDLER_ADDRESS == "unix:///var/run/kre/handler.sock"
    assert s.max_in_flight == 64
    assert s.max_in_flight_bytes == 8 * 1024 * 1024
    assert (s.http_host, s.http_port) == ("0.0.0.0", 8080)
    assert s.max_payload_bytes == 1024 * 1024
    assert s.max_message_bytes == 32 * 1024 * 1024  # bounds the sidecar's memory: README, "Memory"
    assert s.grpc_max_message_bytes == 64 * 1024 * 1024
    assert (s.ack_wait, s.max_deliver, s.nak_delay, s.shutdown_grace) == (30.0, 5, 1.0, 20.0)
    assert s.log_level == "INFO"


def test_all_missing_variables_are_listed_in_one_error() -> None:
    with pytest.raises(SettingsError) as info:
        SidecarSettings.from_env({})
    message = str(info.value)
    for name in (
        "KRT_NODE_NAME",
        "KRT_NATS_SERVER",
        "KRT_NATS_INPUT or KRT_NATS_INPUTS",
        "KRT_NATS_OUTPUT",
        "KRT_NATS_STREAM",
    ):
        assert f"{name} is missing" in message
    assert len(info.value.problems) == 5


def test_missing_and_invalid_are_reported_together() -> None:
    env = {**BASE, "KRT_MAX_IN_FLIGHT": "0", "KRT_IS_LAST_NODE": "maybe"}
    del env["KRT_NATS_STREAM"]
    with pytest.raises(SettingsError) as info:
        SidecarSettings.from_env(env)
    assert len(info.value.problems) == 3
    assert "KRT_NATS_STREAM is missing" in str(info.value)
    assert "KRT_MAX_IN_FLIGHT must be an integer >= 1, got '0'" in str(info.value)
    assert "KRT_IS_LAST_NODE must be true/false/1/0/yes/no, got 'maybe'" in str(info.value)


def test_inputs_plural_is_comma_separated() -> None:
    env = {**BASE, "KRT_NATS_INPUTS": "wf.a, wf.b,,wf.c "}
    del env["KRT_NATS_INPUT"]
    assert SidecarSettings.from_env(env).nats_inputs == ("wf.a", "wf.b", "wf.c")


def test_input_and_inputs_together_are_a_union_without_duplicates() -> None:
    s = settings(KRT_NATS_INPUTS="wf.x,wf.node-a")
    assert s.nats_inputs == ("wf.node-a", "wf.x")


def test_several_nats_servers() -> None:
    s = settings(KRT_NATS_SERVER="nats://a:4222, nats://b:4222")
    assert s.nats_servers == ("nats://a:4222", "nats://b:4222")


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("false", False),
        ("0", False),
        ("No", False),
        ("", False),
    ],
)
def test_booleans(raw: str, value: bool) -> None:
    assert settings(KRT_IS_LAST_NODE=raw).is_last_node is value


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("KRT_MAX_IN_FLIGHT", "abc"),
        ("KRT_MAX_IN_FLIGHT", "-1"),
        ("KRT_MAX_IN_FLIGHT_BYTES", "0"),
        ("KRT_MAX_IN_FLIGHT_BYTES", "32MiB"),
        ("KRT_MAX_DELIVER", "0"),
        ("KRT_HTTP_PORT", "70000"),
        ("KRT_HTTP_PORT", "-1"),
        ("KRT_MAX_PAYLOAD_BYTES", "1.5"),
        ("KRT_ACK_WAIT", "0"),
        ("KRT_ACK_WAIT", "soon"),
        ("KRT_NAK_DELAY", "-1"),
        ("KRT_SHUTDOWN_GRACE", "inf"),
        ("KRT_LOG_LEVEL", "LOUD"),
    ],
)
def test_invalid_values_are_named(name: str, raw: str) -> None:
    with pytest.raises(SettingsError) as info:
        settings(**{name: raw})
    assert len(info.value.problems) == 1
    assert name in info.value.problems[0]
    assert repr(raw.upper() if name == "KRT_LOG_LEVEL" else raw) in info.value.problems[0]


def test_numbers_are_parsed() -> None:
    s = settings(
        KRT_MAX_IN_FLIGHT="8",
        KRT_MAX_IN_FLIGHT_BYTES="1000000",
        KRT_HTTP_PORT="0",
        KRT_MAX_PAYLOAD_BYTES="2048",
        KRT_MAX_MESSAGE_BYTES="4096",
        KRT_GRPC_MAX_MESSAGE_BYTES="8192",
        KRT_ACK_WAIT="1.5",
        KRT_MAX_DELIVER="3",
        KRT_NAK_DELAY="0",
        KRT_SHUTDOWN_GRACE="0.5",
    )
    assert (s.max_in_flight, s.max_in_flight_bytes, s.http_port) == (8, 1_000_000, 0)
    assert (s.max_payload_bytes, s.max_message_bytes, s.grpc_max_message_bytes) == (
        2048,
        4096,
        8192,
    )
    assert (s.ack_wait, s.max_deliver, s.nak_delay, s.shutdown_grace) == (1.5, 3, 0.0, 0.5)


def test_optional_strings() -> None:
    s = settings(
        KRT_WORKFLOW_NAME="wf",
        KRT_VERSION_ID="v-id",
        KRT_VERSION="v1",
        KRT_NATS_ENTRYPOINT_SUBJECT="wf.entrypoint",
        KRT_NATS_DURABLE="custom",
        KRT_HANDLER_ADDRESS="127.0.0.1:50051",
        KRT_HTTP_HOST="127.0.0.1",
        KRT_LOG_LEVEL="debug",
    )
    assert (s.workflow_name, s.version_id, s.version) == ("wf", "v-id", "v1")
    assert s.entrypoint_subject == "wf.entrypoint"
    assert s.durable == "custom"
    assert s.handler_address == "127.0.0.1:50051"
    assert s.http_host == "127.0.0.1"
    assert s.log_level == "DEBUG"


def test_durable_defaults_to_the_sanitized_node_name() -> None:
    assert settings(KRT_NODE_NAME="my node.v1/x*").durable == "my_node_v1_x_"
    assert sanitize_durable("Node-1_ok") == "Node-1_ok"


def test_empty_output_falls_back_to_the_entrypoint_like_kre_last_nodes() -> None:
    s = settings(KRT_NATS_OUTPUT="", KRT_NATS_ENTRYPOINT_SUBJECT="wf.entrypoint")
    assert s.nats_output == "wf.entrypoint"


def test_empty_output_without_entrypoint_is_an_error() -> None:
    with pytest.raises(SettingsError, match="KRT_NATS_OUTPUT is empty"):
        settings(KRT_NATS_OUTPUT="")


def test_handler_host_variables_are_accepted_and_ignored() -> None:
    s = settings(
        KRT_BASE_PATH="/krt",
        KRT_HANDLER_PATH="src/handler.py",
        KRT_MONGO_URI="mongodb://user:secret@mongo:27017",
        KRT_INFLUX_URI="http://influx:8086",
        KRT_NATS_MONGO_WRITER="mongo_writer",
    )
    assert "secret" not in s.summary()


def test_in_flight_bytes_error_says_what_is_expected() -> None:
    with pytest.raises(SettingsError) as info:
        settings(KRT_MAX_IN_FLIGHT_BYTES="32M")
    assert str(info.value).endswith("KRT_MAX_IN_FLIGHT_BYTES must be an integer >= 1, got '32M'")


def test_summary_is_one_line() -> None:
    summary = settings(KRT_NATS_INPUTS="a,b").summary()
    assert "\n" not in summary
    assert "inputs=wf.node-a,a,b" in summary


def test_settings_are_frozen() -> None:
    s = settings()
    with pytest.raises(AttributeError):
        s.node_name = "other"  # type: ignore[misc]


def test_dead_letter_subject_of_a_kre_stream_is_one_token_under_it() -> None:
    # A KRE v1 stream captures `<stream>.*`: `<output>.dlq` would be two tokens under it.
    kre = {
        "KRT_NODE_NAME": "nodeB",
        "KRT_NATS_STREAM": "runtime1-greeter-v1-Greet",
        "KRT_NATS_OUTPUT": "runtime1-greeter-v1-Greet.nodeC",
    }
    assert settings(**kre).dlq_subject == "runtime1-greeter-v1-Greet.nodeB-dlq"
    last = settings(
        **{**kre, "KRT_NATS_OUTPUT": ""}, KRT_NATS_ENTRYPOINT_SUBJECT="runtime1-greeter-v1-Greet.ep"
    )
    assert last.dlq_subject == "runtime1-greeter-v1-Greet.nodeB-dlq"
    odd_name = settings(**{**kre, "KRT_NODE_NAME": "node b.1"})
    assert odd_name.dlq_subject == "runtime1-greeter-v1-Greet.node_b_1-dlq"
    assert settings(**kre, KRT_NATS_DLQ_SUBJECT="x.y").dlq_subject == "x.y"


def test_dead_letter_subject_defaults_to_the_output_dot_dlq() -> None:
    assert settings().dlq_subject == "wf.node-b.dlq"
    assert settings(KRT_NATS_DLQ_SUBJECT="wf.dead").dlq_subject == "wf.dead"
    last = settings(KRT_NATS_OUTPUT="", KRT_NATS_ENTRYPOINT_SUBJECT="wf.entry")
    assert last.dlq_subject == "wf.entry.dlq"


def test_handler_timeout_and_the_sidecar_safety_net() -> None:
    assert settings().handler_timeout == 0.0
    assert settings().result_timeout is None  # no limit: a 10-minute handler is fine
    s = settings(KRT_HANDLER_TIMEOUT="30")
    assert s.handler_timeout == 30.0
    # A sync handler may wait the timeout for a thread, then run the timeout: plus a margin.
    assert s.result_timeout == 65.0
    with pytest.raises(SettingsError, match="KRT_HANDLER_TIMEOUT"):
        settings(KRT_HANDLER_TIMEOUT="-1")


@pytest.mark.parametrize(
    ("address", "endpoint"),
    [
        ("unix:///var/run/kre/handler.sock", (None, None, "/var/run/kre/handler.sock")),
        ("unix:/tmp/h.sock", (None, None, "/tmp/h.sock")),
        ("unix:run/h.sock", (None, None, "run/h.sock")),
        ("unix-abstract:kre-handler", (None, None, "\0kre-handler")),
        ("127.0.0.1:50051", ("127.0.0.1", 50051, None)),
        ("localhost:7000", ("localhost", 7000, None)),
        ("[::1]:50051", ("::1", 50051, None)),
        ("dns:///localhost:50051", ("localhost", 50051, None)),
        ("dns:localhost:50051", ("localhost", 50051, None)),
        ("ipv4:127.0.0.1:50051", ("127.0.0.1", 50051, None)),
        ("ipv6:[::1]:50051", ("::1", 50051, None)),
    ],
)
def test_handler_addresses_the_handler_host_listens_on(address: str, endpoint: tuple) -> None:
    assert handler_endpoint(address) == endpoint
    assert settings(KRT_HANDLER_ADDRESS=address).handler_address == address


@pytest.mark.parametrize(
    "address",
    [
        "unix://relative.sock",
        "unix:",
        "unix-abstract:",
        "127.0.0.1",
        "host:port",
        ":50051",
        "h:70000",
        "localhost:\u00b2",  # a digit to str.isdigit, not to int()
        "::1:50051",  # IPv6 wants brackets
        "[::1:50051",
        "dns:///",
        "dns://8.8.8.8/example.com:50051",  # an authority: not supported
        "ipv4:localhost:50051",
        "ipv6:127.0.0.1:50051",
        "http://localhost:50051",
    ],
)
def test_a_handler_address_of_no_known_form_is_refused(address: str) -> None:
    with pytest.raises(SettingsError) as info:
        settings(KRT_HANDLER_ADDRESS=address)
    [problem] = info.value.problems
    assert problem.startswith(f"KRT_HANDLER_ADDRESS={address!r}: ")
    assert any(word in problem for word in ("unix://", "empty", "dns:///", "wants an IPV"))


def test_jetstream_domain_or_api_prefix() -> None:
    assert settings().js_api_prefix == "$JS.API"
    assert settings(KRT_NATS_JS_DOMAIN="hub").js_api_prefix == "$JS.hub.API"
    assert settings(KRT_NATS_JS_API_PREFIX="$JS.acc.API.").js_api_prefix == "$JS.acc.API"
    with pytest.raises(SettingsError) as raised:
        settings(KRT_NATS_JS_DOMAIN="a.b", KRT_NATS_JS_API_PREFIX="$JS.x.API")
    problems = raised.value.problems
    assert any("not both" in p for p in problems)
    assert any("KRT_NATS_JS_DOMAIN must be one subject token" in p for p in problems)


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("KRT_ACK_WAIT", "0.001", "a number of seconds from 1 to 3600"),
        ("KRT_ACK_WAIT", "3601", "a number of seconds from 1 to 3600"),
        ("KRT_ACK_WAIT", "nan", "a number of seconds from 1 to 3600"),
        ("KRT_NAK_DELAY", "1e6", "a number of seconds from 0 to 3600"),
        ("KRT_SHUTDOWN_GRACE", "86400", "a number of seconds from 0 to 3600"),
        ("KRT_HANDLER_TIMEOUT", "inf", "0 (no limit) or seconds up to 86400"),
        ("KRT_HANDLER_TIMEOUT", "-0.5", "0 (no limit) or seconds up to 86400"),
    ],
)
def test_every_duration_has_bounds(name: str, raw: str, expected: str) -> None:
    with pytest.raises(SettingsError) as info:
        settings(**{name: raw})
    assert info.value.problems == (f"{name} must be {expected}, got {raw!r}",)


def test_durations_at_their_bounds_are_taken() -> None:
    s = settings(KRT_ACK_WAIT="1", KRT_NAK_DELAY="0", KRT_SHUTDOWN_GRACE="3600")
    assert (s.ack_wait, s.nak_delay, s.shutdown_grace) == (1.0, 0.0, 3600.0)
    assert settings(KRT_HANDLER_TIMEOUT="86400").handler_timeout == 86400.0


@pytest.mark.parametrize("durable", ["a.b", "a b", "a*", "a>", "a/b", "a\\b", "a\tb", "x" * 256])
def test_a_durable_name_jetstream_refuses_stops_the_start(durable: str) -> None:
    with pytest.raises(SettingsError) as info:
        settings(KRT_NATS_DURABLE=durable)
    (problem,) = info.value.problems
    assert problem.startswith(f"KRT_NATS_DURABLE={durable!r} ")
    assert problem.endswith("JetStream refuses it as a consumer name")


def test_kre_style_durable_names_are_taken() -> None:
    assert settings(KRT_NATS_DURABLE="v1-node_a").durable == "v1-node_a"


def test_bad_settings_exit_with_one_line_and_no_traceback() -> None:
    env = {
        **BASE,
        "KRT_NATS_SERVER": "nats://kre:s3cret-pass@:4222",
        "KRT_NATS_DURABLE": "a.b",
        "KRT_ACK_WAIT": "0.001",
        "PATH": os.environ.get("PATH", ""),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar"], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    for part in ("KRT_NATS_SERVER", "has no host", "KRT_NATS_DURABLE='a.b'", "KRT_ACK_WAIT"):
        assert part in lines[0]
    assert "s3cret" not in lines[0] and "Traceback" not in lines[0]


# --- NATS URLs, TLS and credentials (tests/integration/test_nats_auth.py connects) ----


def test_credentials_in_the_url_are_taken_out_and_decoded() -> None:
    s = settings(KRT_NATS_SERVER="nats://kre:p%40ss%2Cw%25rd@a:4222, tls://kre:p%40ss%2Cw%25rd@b")
    assert s.nats_servers == ("nats://a:4222", "tls://b")
    security = s.nats_security
    assert (security.user, security.password) == ("kre", "p@ss,w%rd")
    assert security.tls_required  # a tls:// URL
    assert "p@ss" not in repr(s) and "p@ss" not in s.summary()
    assert "auth=user/password tls=system-ca" in s.summary()


def test_a_raw_at_or_slash_in_the_url_password_still_parses() -> None:
    # The userinfo ends at the last '@': only ',' and '%' need encoding.
    security = settings(KRT_NATS_SERVER="nats://kre:a@b/c#d?e@host:4222").nats_security
    assert security.password == "a@b/c#d?e"


def test_a_lone_user_in_the_url_is_a_token_as_in_nats_py() -> None:
    s = settings(KRT_NATS_SERVER="nats://s3cr%2Ft@host:4222")
    assert s.nats_servers == ("nats://host:4222",)
    assert s.nats_security.token == "s3cr/t"
    assert s.nats_security.connect_options() == {"token": "s3cr/t"}


@pytest.mark.parametrize(
    ("server", "problem"),
    [
        ("nats://kre:s3cret@:4222", "URL 1 of 1 has no host"),
        ("nats://kre:s3cret@", "URL 1 of 1 has no host"),
        ("http://kre:s3cret@host:80", "URL 1 of 1 has the scheme 'http'"),
        ("nats://kre:s3cret@host:99999", "URL 1 of 1 has an invalid port"),
        ("nats://kre:s3cret@a:1,nats://b:2", "give every URL the same credentials"),
        # A raw ',' splits the password across two "URLs": neither half is shown.
        ("nats://kre:s3,cret@a:1", "URL 1 of 2 has an invalid port (not shown"),
        ("nats://:4222", "'nats://:4222' has no host"),
    ],
)
def test_a_malformed_server_url_is_named_without_its_password(server: str, problem: str) -> None:
    with pytest.raises(SettingsError) as info:
        settings(KRT_NATS_SERVER=server)
    assert problem in str(info.value)
    for secret in ("s3cret", "s3", "cret"):
        assert secret not in str(info.value)


@pytest.fixture
def files(tmp_path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    made = {}
    for name in ("ca.crt", "tls.crt", "tls.key", "user.creds", "user.nk"):
        (tmp_path / name).write_text("not what it should be\n")
        made[name] = str(tmp_path / name)
    return made


def test_one_way_to_authenticate(files: dict[str, str]) -> None:
    with pytest.raises(SettingsError) as info:
        settings(
            KRT_NATS_SERVER="nats://kre:pw@host",
            KRT_NATS_TOKEN="t",
            KRT_NATS_CREDS_FILE=files["user.creds"],
        )
    (problem,) = info.value.problems
    assert problem == (
        "set one way to authenticate to NATS, not KRT_NATS_CREDS_FILE and KRT_NATS_TOKEN "
        "and credentials in KRT_NATS_SERVER"
    )


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"KRT_NATS_USER": "kre"}, "KRT_NATS_USER is set without KRT_NATS_PASSWORD"),
        ({"KRT_NATS_PASSWORD": "pw"}, "KRT_NATS_PASSWORD is set without KRT_NATS_USER"),
        ({"KRT_NATS_TLS_CERT_FILE": "tls.crt"}, "go together (mutual TLS)"),
        ({"KRT_NATS_TLS_CA_FILE": "/nonexistent/ca.crt"}, "is not a readable file"),
        ({"KRT_NATS_CREDS_FILE": "/tmp"}, "KRT_NATS_CREDS_FILE='/tmp' is not a readable file"),
        ({"KRT_NATS_NKEY_SEED_FILE": "/tmp"}, "is not a readable file"),
        ({"KRT_NATS_TLS_CA_FILE": "ca.crt"}, "the KRT_NATS_TLS_* files cannot be loaded"),
        ({"KRT_NATS_CREDS_FILE": "user.creds"}, "is not a .creds file"),
        ({"KRT_NATS_NKEY_SEED_FILE": "user.nk"}, "does not hold an NKEY seed"),
    ],
)
def test_tls_and_credential_problems(
    files: dict[str, str], env: dict[str, str], problem: str
) -> None:
    env = {name: files.get(value, value) for name, value in env.items()}
    with pytest.raises(SettingsError) as info:
        settings(**env)
    assert problem in str(info.value)
    assert "pw" not in str(info.value)


def test_tls_files_make_tls_required_and_a_ws_url_is_refused_then(files: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="use wss:// instead of ws://"):
        settings(KRT_NATS_SERVER="ws://host:80", KRT_NATS_TLS_CA_FILE="/nonexistent")
    plain = settings().nats_security
    assert not plain.tls_required and plain.ssl_context() is None
    assert plain.connect_options() == {}
    assert type(plain.client()).__name__ == "Client"


def test_secrets_stay_out_of_repr_and_summary() -> None:
    s = settings(KRT_NATS_USER="kre", KRT_NATS_PASSWORD="hunter2-pw")
    assert "hunter2" not in repr(s) and "hunter2" not in s.summary()
    assert repr(s.nats_security) == "NatsSecurity(auth=user/password tls=off)"
    assert s.nats_security.connect_options() == {"user": "kre", "password": "hunter2-pw"}
    token = settings(KRT_NATS_TOKEN="tok-secret")
    assert "tok-secret" not in repr(token) and "auth=token" in token.summary()
