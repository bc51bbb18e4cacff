"""The handler host's settings: read once from the environment in ``main``, passed down."""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from handler_host.errors import SettingsError
from protos.contract import DEFAULT_HANDLER_ADDRESS as DEFAULT_ADDRESS
from protos.contract import DEFAULT_MAX_MESSAGE_BYTES

DEFAULT_METRICS_PORT = 9090
REQUIRED = ("KRT_BASE_PATH", "KRT_HANDLER_PATH")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_SECRET_QUERY_KEYS = ("password", "token", "secret")
# KRT_HANDLER_TIMEOUT's range, the same in the sidecar (sidecar/settings.py): 0 is
# "no limit", so an infinite timeout is refused by both processes.
MAX_HANDLER_TIMEOUT = 24 * 3600.0
MAX_SHUTDOWN_GRACE = 3600.0
_T = TypeVar("_T")


@dataclass(frozen=True, repr=False)
class HostSettings:
    """Everything the handler host reads from its environment (see ``from_env``)."""

    base_path: str
    handler_path: str
    node_name: str = "handler"
    workflow_name: str = ""
    version_id: str = ""
    version: str = ""
    is_last_node: bool = False  # KRT_IS_LAST_NODE: also write workflow_elapsed_time
    handler_address: str = DEFAULT_ADDRESS
    allow_public: bool = False
    handler_threads: int = 1
    grpc_max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    shutdown_grace: float = 20.0
    handler_timeout: float = 0.0  # seconds per message; 0: no limit
    log_level: str = "INFO"
    log_format: str = "text"  # KRT_LOG_FORMAT: text or json
    # /metrics over HTTP. Built in code (tests, handler_host.testing) it is off (port 0);
    # from the environment KRT_METRICS_PORT defaults to DEFAULT_METRICS_PORT.
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 0
    # Raw strings for the data services (handler_host.services builds the clients).
    mongo_uri: str | None = None
    influx_uri: str | None = None
    nats_mongo_writer: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> HostSettings:
        """Read and check every variable; raise one SettingsError listing all problems.

        Empty values count as unset. Required: KRT_BASE_PATH, KRT_HANDLER_PATH.
        """
        reader = _Reader(env)
        for name in REQUIRED:
            reader.require(name)
        address = reader.text("KRT_HANDLER_ADDRESS", DEFAULT_ADDRESS)
        allow_public = reader.parse("KRT_HANDLER_ALLOW_PUBLIC", False, _parse_bool, "true or false")
        reader.check_address("KRT_HANDLER_ADDRESS", address, allow_public)
        settings = cls(
            base_path=reader.text("KRT_BASE_PATH", ""),
            handler_path=reader.text("KRT_HANDLER_PATH", ""),
            node_name=reader.text("KRT_NODE_NAME", "handler"),
            workflow_name=reader.text("KRT_WORKFLOW_NAME", ""),
            version_id=reader.text("KRT_VERSION_ID", ""),
            version=reader.text("KRT_VERSION", ""),
            is_last_node=reader.parse("KRT_IS_LAST_NODE", False, _parse_bool, "true or false"),
            handler_address=address,
            allow_public=allow_public,
            handler_threads=reader.parse(
                "KRT_HANDLER_THREADS", 1, _positive_int, "an integer >= 1"
            ),
            grpc_max_message_bytes=reader.parse(
                "KRT_GRPC_MAX_MESSAGE_BYTES",
                DEFAULT_MAX_MESSAGE_BYTES,
                _positive_int,
                "a number of bytes, an integer >= 1",
            ),
            shutdown_grace=reader.parse(
                "KRT_SHUTDOWN_GRACE",
                20.0,
                _shutdown_grace,
                f"seconds from 0 to {MAX_SHUTDOWN_GRACE:g}",
            ),
            handler_timeout=reader.parse(
                "KRT_HANDLER_TIMEOUT",
                0.0,
                _handler_timeout,
                f"0 (no limit) or seconds up to {MAX_HANDLER_TIMEOUT:g}",
            ),
            log_level=reader.parse(
                "KRT_LOG_LEVEL", "INFO", _log_level, "DEBUG, INFO, WARNING, ERROR or CRITICAL"
            ),
            log_format=reader.parse("KRT_LOG_FORMAT", "text", _log_format, "text or json"),
            metrics_host=reader.text("KRT_METRICS_HOST", "0.0.0.0"),
            metrics_port=reader.parse(
                "KRT_METRICS_PORT", DEFAULT_METRICS_PORT, _port, "a TCP port, 0 to 65535 (0: off)"
            ),
            mongo_uri=reader.optional("KRT_MONGO_URI"),
            influx_uri=reader.optional("KRT_INFLUX_URI"),
            nats_mongo_writer=reader.optional("KRT_NATS_MONGO_WRITER"),
        )
        if reader.missing or reader.invalid:
            raise SettingsError(reader.missing, reader.invalid)
        return settings

    @property
    def handler_file(self) -> str:
        """KRT_HANDLER_PATH joined to KRT_BASE_PATH (an absolute KRT_HANDLER_PATH wins)."""
        return os.path.join(self.base_path, self.handler_path)

    def summary(self) -> str:
        """One log line with every setting; URIs have their passwords masked."""
        parts = []
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name.endswith("_uri") and value:
                value = mask_uri(value)
            parts.append(f"{field.name}={value!r}")
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"HostSettings({self.summary()})"


def mask_uri(uri: str) -> str:
    """Hide the password of ``uri`` (``mongodb://user:***@host``) and secret query values.

    The userinfo is found by the last ``@`` of the whole URI, not by URL parsing: a
    password with an unescaped ``/``, ``?`` or ``#`` must not slip through.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return "***" if "@" in uri else uri
    userinfo, at, after = rest.rpartition("@")
    if at:
        user = userinfo.split(":", 1)[0]
        rest = f"{user}:***@{after}" if ":" in userinfo else f"{user}@{after}"
    try:
        parts = urlsplit(f"{scheme}://{rest}")
    except ValueError:
        return "***"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if _is_secret_key(k, v) else v) for k, v in pairs], safe="*:@")
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def _is_secret_key(key: str, value: str) -> bool:
    lowered = key.lower()
    return lowered.endswith(_SECRET_QUERY_KEYS) or (
        lowered == "authmechanismproperties" and "TOKEN" in value.upper()
    )


def is_loopback_address(address: str) -> bool:
    """True when a gRPC bind address is a Unix socket or a loopback interface."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = _split_host_port(address)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        # A host name, or an empty host (binds every interface): not provably local.
        return False


def _split_host_port(address: str) -> tuple[str, str]:
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, rest.removeprefix(":")
    host, _, port = address.rpartition(":")
    return host, port


class _Reader:
    """Collects every missing or invalid variable instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        self.missing: list[str] = []
        self.invalid: list[str] = []

    def optional(self, name: str) -> str | None:
        return self._env.get(name, "").strip() or None

    def text(self, name: str, default: str) -> str:
        return self.optional(name) or default

    def require(self, name: str) -> None:
        if self.optional(name) is None:
            self.missing.append(name)

    def parse(self, name: str, default: _T, convert: Callable[[str], _T], expected: str) -> _T:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            return convert(raw)
        except ValueError:
            self.invalid.append(f"{name}={raw!r}, expected {expected}")
            return default

    def check_address(self, name: str, address: str, allow_public: bool) -> None:
        if not address.startswith(("unix:", "unix-abstract:")):
            port = _split_host_port(address)[1]
            if not port.isdigit():
                self.invalid.append(
                    f"{name}={address!r}, expected unix:///path/to.sock or HOST:PORT"
                )
                return
        if not allow_public and not is_loopback_address(address):
            self.invalid.append(
                f"{name}={address!r} binds a non-loopback interface: the handler host "
                "runs user code and has no authentication, so it listens on a Unix socket "
                "or 127.0.0.1 by default; set KRT_HANDLER_ALLOW_PUBLIC=true if the pod "
                "network really must reach it"
            )


def _parse_bool(raw: str) -> bool:
    value = raw.lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(raw)


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError(raw)
    return value


def _shutdown_grace(raw: str) -> float:
    value = float(raw)
    if not 0 <= value <= MAX_SHUTDOWN_GRACE:  # the sidecar's bound too; refuses NaN, inf
        raise ValueError(raw)
    return value


def _handler_timeout(raw: str) -> float:
    value = float(raw)
    if not 0 <= value <= MAX_HANDLER_TIMEOUT:  # also refuses NaN and inf
        raise ValueError(raw)
    return value


def _log_format(raw: str) -> str:
    value = raw.lower()
    if value not in ("text", "json"):
        raise ValueError(raw)
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError(raw)
    return value


def _log_level(raw: str) -> str:
    level = raw.upper()
    if not isinstance(logging.getLevelNamesMapping().get(level), int):
        raise ValueError(raw)
    return level
