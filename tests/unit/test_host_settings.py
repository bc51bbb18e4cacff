"""HostSettings.from_env, read_settings: every problem listed at once, no secrets shown."""

from __future__ import annotations

import pytest

from handler_host.errors import SettingsError
from handler_host.main import read_settings
from handler_host.settings import (
    DEFAULT_ADDRESS,
    DEFAULT_MAX_MESSAGE_BYTES,
    HostSettings,
    is_loopback_address,
    mask_uri,
)

REQUIRED = {"KRT_BASE_PATH": "/src", "KRT_HANDLER_PATH": "handler.py"}


def test_defaults() -> None:
    settings = HostSettings.from_env(REQUIRED)

    assert settings.base_path == "/src"
    assert settings.handler_path == "handler.py"
    assert settings.handler_file == "/src/handler.py"
    assert settings.node_name == "handler"
    assert settings.handler_address == DEFAULT_ADDRESS == "unix:///var/run/kre/handler.sock"
    assert settings.handler_threads == 1
    assert settings.grpc_max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES == 64 * 1024 * 1024
    assert settings.shutdown_grace == 20.0
    assert settings.log_level == "INFO"
    assert settings.allow_public is False
    assert settings.mongo_uri is None
    assert settings.influx_uri is None
    assert settings.nats_mongo_writer is None


def test_every_variable_is_read() -> None:
    env = {
        **REQUIRED,
        "KRT_NODE_NAME": "normalizer",
        "KRT_WORKFLOW_NAME": "wf",
        "KRT_VERSION_ID": "v-id",
        "KRT_VERSION": "v1",
        "KRT_HANDLER_ADDRESS": "127.0.0.1:50051",
        "KRT_HANDLER_THREADS": "4",
        "KRT_GRPC_MAX_MESSAGE_BYTES": "1024",
        "KRT_SHUTDOWN_GRACE": "2.5",
        "KRT_LOG_LEVEL": "debug",
        "KRT_MONGO_URI": "mongodb://localhost:27017",
        "KRT_INFLUX_URI": "http://localhost:8086",
        "KRT_NATS_MONGO_WRITER": "mongo_writer",
    }

    settings = HostSettings.from_env(env)

    assert (settings.node_name, settings.workflow_name) == ("normalizer", "wf")
    assert (settings.version_id, settings.version) == ("v-id", "v1")
    assert settings.handler_address == "127.0.0.1:50051"
    assert settings.handler_threads == 4
    assert settings.grpc_max_message_bytes == 1024
    assert settings.shutdown_grace == 2.5
    assert settings.log_level == "DEBUG"
    assert settings.mongo_uri == "mongodb://localhost:27017"
    assert settings.influx_uri == "http://localhost:8086"
    assert settings.nats_mongo_writer == "mongo_writer"


def test_absolute_handler_path_wins() -> None:
    settings = HostSettings.from_env({**REQUIRED, "KRT_HANDLER_PATH": "/elsewhere/h.py"})
    assert settings.handler_file == "/elsewhere/h.py"


def test_all_missing_variables_in_one_error() -> None:
    with pytest.raises(SettingsError) as caught:
        HostSettings.from_env({"KRT_BASE_PATH": "  "})

    assert caught.value.missing == ["KRT_BASE_PATH", "KRT_HANDLER_PATH"]
    assert "KRT_BASE_PATH, KRT_HANDLER_PATH" in str(caught.value)


def test_host_and_data_service_problems_in_one_error() -> None:
    env = {"KRT_HANDLER_PATH": "handler.py", "KRT_MONGO_TIMEOUT": "soon", "KRT_MONGO_DB": "a.b"}

    with pytest.raises(SettingsError) as caught:
        read_settings(env)

    error = caught.value
    assert error.missing == ["KRT_BASE_PATH"]
    assert [problem.split("=")[0] for problem in error.invalid] == [
        "KRT_MONGO_TIMEOUT",
        "KRT_MONGO_DB",
    ]
    assert "KRT_MONGO_TIMEOUT='soon', expected seconds" in str(error)


def test_host_and_data_service_settings_read_together() -> None:
    settings, services = read_settings({**REQUIRED, "KRT_MONGO_TIMEOUT": "2.5"})

    assert settings.handler_file == "/src/handler.py"
    assert services.mongo_timeout_s == 2.5


def test_missing_and_invalid_listed_together() -> None:
    env = {
        "KRT_HANDLER_PATH": "handler.py",
        "KRT_HANDLER_THREADS": "many",
        "KRT_GRPC_MAX_MESSAGE_BYTES": "0",
        "KRT_SHUTDOWN_GRACE": "-1",
        "KRT_LOG_LEVEL": "LOUD",
        "KRT_HANDLER_ALLOW_PUBLIC": "maybe",
    }

    with pytest.raises(SettingsError) as caught:
        HostSettings.from_env(env)

    error = caught.value
    assert error.missing == ["KRT_BASE_PATH"]
    message = str(error)
    assert "KRT_HANDLER_THREADS='many', expected an integer >= 1" in message
    assert "KRT_GRPC_MAX_MESSAGE_BYTES='0', expected a number of bytes" in message
    assert "KRT_SHUTDOWN_GRACE='-1', expected seconds" in message
    assert "KRT_LOG_LEVEL='LOUD'" in message
    assert "KRT_HANDLER_ALLOW_PUBLIC='maybe', expected true or false" in message
    assert len(error.invalid) == 5


@pytest.mark.parametrize("address", ["0.0.0.0:50051", "[::]:50051", ":50051", "10.1.2.3:50051"])
def test_public_address_refused(address: str) -> None:
    with pytest.raises(SettingsError) as caught:
        HostSettings.from_env({**REQUIRED, "KRT_HANDLER_ADDRESS": address})

    message = str(caught.value)
    assert address in message
    assert "non-loopback" in message
    assert "KRT_HANDLER_ALLOW_PUBLIC=true" in message


def test_public_address_allowed_when_asked() -> None:
    env = {**REQUIRED, "KRT_HANDLER_ADDRESS": "0.0.0.0:50051", "KRT_HANDLER_ALLOW_PUBLIC": "true"}
    settings = HostSettings.from_env(env)
    assert settings.handler_address == "0.0.0.0:50051"
    assert settings.allow_public is True


@pytest.mark.parametrize(
    "address",
    ["unix:///var/run/kre/handler.sock", "unix:h.sock", "127.0.0.1:0", "[::1]:5", "localhost:1"],
)
def test_local_addresses_accepted(address: str) -> None:
    assert is_loopback_address(address)
    assert HostSettings.from_env({**REQUIRED, "KRT_HANDLER_ADDRESS": address})


def test_address_without_port_is_invalid() -> None:
    with pytest.raises(SettingsError, match=r"expected unix:///path/to\.sock or HOST:PORT"):
        HostSettings.from_env({**REQUIRED, "KRT_HANDLER_ADDRESS": "127.0.0.1"})


@pytest.mark.parametrize(
    ("uri", "masked"),
    [
        ("mongodb://user:s3cret@host:27017/db", "mongodb://user:***@host:27017/db"),
        (
            "mongodb://admin:p%40ss@h1:27017,h2:27017/kre?replicaSet=rs0",
            "mongodb://admin:***@h1:27017,h2:27017/kre?replicaSet=rs0",
        ),
        ("mongodb://localhost:27017", "mongodb://localhost:27017"),
        ("http://influx:8086?org=o&token=abc123", "http://influx:8086?org=o&token=***"),
        ("http://only-user@influx:8086", "http://only-user@influx:8086"),
    ],
)
def test_mask_uri(uri: str, masked: str) -> None:
    assert mask_uri(uri) == masked


def test_summary_and_repr_mask_passwords() -> None:
    env = {
        **REQUIRED,
        "KRT_MONGO_URI": "mongodb://kre:topsecret@mongo:27017/admin",
        "KRT_INFLUX_URI": "http://user:alsosecret@influx:8086",
    }
    settings = HostSettings.from_env(env)

    for text in (settings.summary(), repr(settings), str(settings)):
        assert "topsecret" not in text
        assert "alsosecret" not in text
        assert "mongodb://kre:***@mongo:27017/admin" in text
    assert settings.mongo_uri == env["KRT_MONGO_URI"]  # the real value is kept for the client


def test_settings_are_frozen() -> None:
    settings = HostSettings.from_env(REQUIRED)
    with pytest.raises(AttributeError):
        settings.node_name = "other"  # type: ignore[misc]


def test_handler_timeout() -> None:
    assert HostSettings.from_env(REQUIRED).handler_timeout == 0.0
    assert HostSettings.from_env({**REQUIRED, "KRT_HANDLER_TIMEOUT": "2.5"}).handler_timeout == 2.5
    with pytest.raises(SettingsError, match="KRT_HANDLER_TIMEOUT"):
        HostSettings.from_env({**REQUIRED, "KRT_HANDLER_TIMEOUT": "soon"})


@pytest.mark.parametrize(
    ("uri", "masked"),
    [
        ("mongodb://u:pa/ss@h:1/db", "mongodb://u:***@h:1/db"),
        ("mongodb://u:pa#ss@h", "mongodb://u:***@h"),
        ("mongodb://u:pa?ss@h/?x=1", "mongodb://u:***@h/?x=1"),
        ("mongodb://u@h", "mongodb://u@h"),
        ("mongodb://h:1/db?tls=true", "mongodb://h:1/db?tls=true"),
        (
            "mongodb://u:p@h1,h2/db?authSource=admin&password=x",
            "mongodb://u:***@h1,h2/db?authSource=admin&password=***",
        ),
        (
            "mongodb://u:p@h/?authMechanismProperties=AWS_SESSION_TOKEN:abc",
            "mongodb://u:***@h/?authMechanismProperties=***",
        ),
    ],
)
def test_mask_uri_hides_passwords_with_url_delimiters(uri: str, masked: str) -> None:
    from handler_host.settings import mask_uri

    assert mask_uri(uri) == masked


@pytest.mark.parametrize(
    ("raw", "accepted"),
    [
        ("0", True),
        ("0.5", True),
        ("86400", True),
        ("86401", False),
        ("inf", False),
        ("Infinity", False),
        ("nan", False),
        ("-1", False),
        ("1e9", False),
        ("soon", False),
    ],
)
def test_handler_timeout_is_one_rule_in_both_processes(raw: str, accepted: bool) -> None:
    # Both containers read KRT_HANDLER_TIMEOUT from one ConfigMap: a value that one takes
    # and the other refuses would start half a node.
    from sidecar.errors import SettingsError as SidecarSettingsError
    from sidecar.settings import SidecarSettings

    sidecar_env = {
        "KRT_NODE_NAME": "n",
        "KRT_NATS_SERVER": "nats://127.0.0.1:4222",
        "KRT_NATS_INPUT": "s.in",
        "KRT_NATS_OUTPUT": "s.out",
        "KRT_NATS_STREAM": "s",
    }
    refusals = []
    try:
        HostSettings.from_env({**REQUIRED, "KRT_HANDLER_TIMEOUT": raw})
    except SettingsError as exc:
        refusals.append(str(exc))
    try:
        SidecarSettings.from_env({**sidecar_env, "KRT_HANDLER_TIMEOUT": raw})
    except SidecarSettingsError as exc:
        refusals.append(str(exc))
    assert len(refusals) == (0 if accepted else 2), refusals
    for text in refusals:
        assert "KRT_HANDLER_TIMEOUT" in text and "0 (no limit) or seconds up to 86400" in text


@pytest.mark.parametrize("raw", ["inf", "nan", "-1", "3601"])
def test_shutdown_grace_follows_the_sidecars_rule(raw: str) -> None:
    from sidecar.errors import SettingsError as SidecarSettingsError
    from sidecar.settings import SidecarSettings

    env = {
        "KRT_SHUTDOWN_GRACE": raw,
        "KRT_BASE_PATH": "/tmp",
        "KRT_HANDLER_PATH": "h.py",
        "KRT_NODE_NAME": "n",
        "KRT_NATS_SERVER": "nats://127.0.0.1:4222",
        "KRT_NATS_INPUT": "s.in",
        "KRT_NATS_OUTPUT": "s.out",
        "KRT_NATS_STREAM": "s",
    }
    with pytest.raises(SettingsError, match="KRT_SHUTDOWN_GRACE"):
        HostSettings.from_env(env)
    with pytest.raises(SidecarSettingsError, match="KRT_SHUTDOWN_GRACE"):
        SidecarSettings.from_env(env)
