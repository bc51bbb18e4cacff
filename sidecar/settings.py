"""The sidecar's settings: one frozen dataclass, read once from the environment.

The variable names are KRE's (`KRT_*`). The handler host reads its own variables
(`KRT_BASE_PATH`, `KRT_HANDLER_PATH`, `KRT_MONGO_URI`...) from the same pod
environment; the sidecar ignores them.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from protos.contract import DEFAULT_HANDLER_ADDRESS, DEFAULT_MAX_MESSAGE_BYTES
from sidecar.connection import NatsSecurity, read_nats
from sidecar.errors import SettingsError

MIB = 1024 * 1024
# Seconds the sidecar waits for a Result beyond what KRT_HANDLER_TIMEOUT allows the host.
RESULT_TIMEOUT_MARGIN = 5.0

# The same sets as the handler host's: both containers may read one ConfigMap.
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_LOG_LEVELS = frozenset({"CRITICAL", "FATAL", "ERROR", "WARNING", "INFO", "DEBUG", "NOTSET"})
HOUR = 3600.0
# KRT_HANDLER_TIMEOUT's range, the same in the handler host (handler_host/settings.py):
# 0 is "no limit", so an infinite timeout is refused there and here.
MAX_HANDLER_TIMEOUT = 24 * HOUR
# The keep-alive loop looks at the window every sixth of KRT_ACK_WAIT: below a second it
# would spin, and JetStream redelivers too early for any real handler anyway.
MIN_ACK_WAIT = 1.0
# What JetStream refuses in a consumer name (and a file name on the server's disk).
_BAD_DURABLE_CHARS = frozenset(".*>/\\")
MAX_DURABLE_LENGTH = 255


# The byte budget of the in-flight window. Every message is held several times over
# (fetched, queued for the host, its result, the output), in the sidecar and the host:
# 8 MiB keeps big messages as fast as a larger budget, with less memory in both
# processes (docs/performance.md, "The in-flight byte budget").
DEFAULT_IN_FLIGHT_BYTES = 8 * MIB
# The largest input once decompressed. The sidecar holds about eleven copies of the
# biggest message it works on (gunzipped, parsed, framed for the host, its result, the
# output, gzipped...), and a message over the in-flight budget goes alone: 32 MiB keeps
# its peak under the 512 MiB limit of deploy/kubernetes (README, "Memory", which gives
# the formula; tests/faults/test_memory.py checks it).
DEFAULT_MAX_INPUT_BYTES = 32 * MIB


def handler_endpoint(address: str) -> tuple[str | None, int | None, str | None]:
    """(host, port, socket path) of a gRPC address.

    The forms: `unix:///abs/path`, `unix:path`, `unix-abstract:name`, `HOST:PORT`,
    `[IPv6]:PORT`, and gRPC's `dns:[///]HOST:PORT`, `ipv4:ADDR:PORT`, `ipv6:[ADDR]:PORT`
    (one address each). Raises ValueError, saying what is expected.
    """
    if address.startswith("unix-abstract:"):
        name = address.removeprefix("unix-abstract:")
        if not name:
            raise ValueError("the abstract socket name is empty")
        return None, None, "\0" + name
    if address.startswith("unix:"):
        return None, None, _unix_path(address.removeprefix("unix:"))
    scheme, _, rest = address.partition(":")
    if scheme in ("dns", "ipv4", "ipv6"):
        return _scheme_endpoint(scheme, rest)
    return _host_port(address)


def _scheme_endpoint(scheme: str, rest: str) -> tuple[str, int, None]:
    """gRPC's `dns:[///]HOST:PORT`, `ipv4:ADDR:PORT` and `ipv6:[ADDR]:PORT`."""
    if scheme == "dns":
        if rest.startswith("//") and not rest.startswith("///"):
            raise ValueError("a dns: address with an authority is not supported: dns:///HOST:PORT")
        rest = rest.removeprefix("///")
    host, port, _ = _host_port(rest)
    family = {"ipv4": ipaddress.IPv4Address, "ipv6": ipaddress.IPv6Address}.get(scheme)
    if family is not None:
        try:
            family(host)
        except ValueError:
            raise ValueError(f"{scheme}: wants an {scheme.upper()} address, got {host!r}") from None
    return host, port, None


def _host_port(address: str) -> tuple[str, int, None]:
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # [IPv6]
    elif any(c in host for c in ":[]/"):
        host = ""  # an IPv6 address wants brackets; a URL is not an address
    if not (sep and host and port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError("expected unix:///path/to.sock, HOST:PORT or [IPv6]:PORT")
    return host, int(port), None


def _unix_path(path: str) -> str:
    if path.startswith("//"):  # unix:///abs/path; unix://rel is not a form gRPC knows
        path = path.removeprefix("//")
        if not path.startswith("/"):
            raise ValueError("expected unix:///absolute/path.sock or unix:relative.sock")
    if not path:
        raise ValueError("the socket path is empty")
    return path


@dataclass(frozen=True)
class SidecarSettings:
    node_name: str
    nats_servers: tuple[str, ...]  # never with credentials: see nats_security
    nats_inputs: tuple[str, ...]
    nats_output: str
    nats_stream: str
    dlq_subject: str = ""
    workflow_name: str = ""
    version_id: str = ""
    version: str = ""
    entrypoint_subject: str = ""
    is_last_node: bool = False
    durable: str = ""
    js_api_prefix: str = "$JS.API"  # KRT_NATS_JS_DOMAIN or KRT_NATS_JS_API_PREFIX
    handler_address: str = DEFAULT_HANDLER_ADDRESS
    max_in_flight: int = 64
    max_in_flight_bytes: int = DEFAULT_IN_FLIGHT_BYTES
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    max_payload_bytes: int = MIB
    max_message_bytes: int = DEFAULT_MAX_INPUT_BYTES
    grpc_max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ack_wait: float = 30.0
    max_deliver: int = 5
    nak_delay: float = 1.0
    handler_timeout: float = 0.0  # 0: no limit
    shutdown_grace: float = 20.0
    log_level: str = "INFO"
    log_format: str = "text"  # KRT_LOG_FORMAT: text or json
    # TLS and credentials; its repr shows no secret
    nats_security: NatsSecurity = field(default_factory=NatsSecurity)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SidecarSettings:
        """Build the settings; raise one SettingsError naming every bad variable."""
        reader = _EnvReader(os.environ if env is None else env)
        node_name = reader.required("KRT_NODE_NAME")
        entrypoint = reader.text("KRT_NATS_ENTRYPOINT_SUBJECT")
        output = reader.output(entrypoint)
        stream = reader.required("KRT_NATS_STREAM")
        servers, security, nats_problems = read_nats(reader.env)
        reader.problems += nats_problems
        settings = cls(
            node_name=node_name,
            nats_servers=servers,
            nats_security=security,
            nats_inputs=reader.inputs(),
            nats_output=output,
            nats_stream=stream,
            dlq_subject=reader.text("KRT_NATS_DLQ_SUBJECT")
            or default_dlq_subject(output, stream, node_name),
            workflow_name=reader.text("KRT_WORKFLOW_NAME"),
            version_id=reader.text("KRT_VERSION_ID"),
            version=reader.text("KRT_VERSION"),
            entrypoint_subject=entrypoint,
            is_last_node=reader.boolean("KRT_IS_LAST_NODE", False),
            durable=reader.durable() or sanitize_durable(node_name),
            js_api_prefix=reader.js_api_prefix(),
            handler_address=reader.address("KRT_HANDLER_ADDRESS"),
            max_in_flight=reader.integer("KRT_MAX_IN_FLIGHT", 64, minimum=1),
            max_in_flight_bytes=reader.integer(
                "KRT_MAX_IN_FLIGHT_BYTES", DEFAULT_IN_FLIGHT_BYTES, minimum=1
            ),
            http_host=reader.text("KRT_HTTP_HOST") or "0.0.0.0",
            http_port=reader.integer("KRT_HTTP_PORT", 8080, minimum=0, maximum=65535),
            max_payload_bytes=reader.integer("KRT_MAX_PAYLOAD_BYTES", MIB, minimum=1),
            max_message_bytes=reader.integer(
                "KRT_MAX_MESSAGE_BYTES", DEFAULT_MAX_INPUT_BYTES, minimum=1
            ),
            grpc_max_message_bytes=reader.integer(
                "KRT_GRPC_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES, minimum=1
            ),
            ack_wait=reader.seconds("KRT_ACK_WAIT", 30.0, MIN_ACK_WAIT, HOUR),
            max_deliver=reader.integer("KRT_MAX_DELIVER", 5, minimum=1),
            nak_delay=reader.seconds("KRT_NAK_DELAY", 1.0, 0.0, HOUR),
            handler_timeout=reader.seconds(
                "KRT_HANDLER_TIMEOUT", 0.0, 0.0, MAX_HANDLER_TIMEOUT, zero="no limit"
            ),
            shutdown_grace=reader.seconds("KRT_SHUTDOWN_GRACE", 20.0, 0.0, HOUR),
            log_level=reader.log_level(),
            log_format=reader.log_format(),
        )
        if reader.problems:
            raise SettingsError(reader.problems)
        return settings

    @property
    def result_timeout(self) -> float | None:
        """How long the sidecar waits for a Result before it treats the host as unreachable.

        The handler host enforces KRT_HANDLER_TIMEOUT itself: a sync handler may wait up to
        the timeout for a free thread, then run up to the timeout. This is the safety net
        behind it, for a host that does not answer at all: twice the timeout plus a margin.
        None (no limit) when KRT_HANDLER_TIMEOUT is 0.
        """
        if not self.handler_timeout:
            return None
        return 2 * self.handler_timeout + RESULT_TIMEOUT_MARGIN

    def summary(self) -> str:
        """One log line describing the settings. Nothing here is a secret."""
        return (
            f"node={self.node_name} stream={self.nats_stream} "
            f"inputs={','.join(self.nats_inputs)} output={self.nats_output} "
            f"dlq={self.dlq_subject} "
            f"entrypoint={self.entrypoint_subject or '-'} last_node={self.is_last_node} "
            f"durable={self.durable} js_api={self.js_api_prefix} handler={self.handler_address} "
            f"max_in_flight={self.max_in_flight} "
            f"max_in_flight_bytes={self.max_in_flight_bytes} ack_wait={self.ack_wait:g}s "
            f"max_deliver={self.max_deliver} nak_delay={self.nak_delay:g}s "
            f"handler_timeout={self.handler_timeout:g}s "
            f"grace={self.shutdown_grace:g}s http={self.http_host}:{self.http_port} "
            f"nats={','.join(self.nats_servers)} {self.nats_security.describe()}"
        )


def default_dlq_subject(output: str, stream: str, node_name: str) -> str:
    """Where dead letters go unless KRT_NATS_DLQ_SUBJECT says: a subject the stream has.

    A KRE stream captures `<stream>.*`, one token under its name, and its nodes' outputs
    are `<stream>.<node>`: there the dead letters go to `<stream>.<node>-dlq`, which the
    stream captures. Any other output gets `<output>.dlq`.
    """
    if not output:
        return ""
    prefix, _, token = output.rpartition(".")
    if prefix == stream and token:
        return f"{stream}.{sanitize_durable(node_name)}-dlq"
    return f"{output}.dlq"


def sanitize_durable(node_name: str) -> str:
    """A JetStream consumer name from a node name: only [A-Za-z0-9_-]."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", node_name.strip())


def durable_problem(name: str) -> str:
    """Why JetStream would refuse `name` as a consumer name; "" when it would not."""
    bad = sorted({c for c in name if c in _BAD_DURABLE_CHARS or not c.isprintable() or c.isspace()})
    if bad:
        return f"must not contain {' '.join(repr(c) for c in bad)}"
    if len(name) > MAX_DURABLE_LENGTH:
        return f"is longer than {MAX_DURABLE_LENGTH} characters"
    return ""


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


class _EnvReader:
    """Reads variables and collects every problem instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def text(self, name: str) -> str:
        return self.env.get(name, "").strip()

    def required(self, name: str) -> str:
        value = self.text(name)
        if not value:
            self.problems.append(f"{name} is missing")
        return value

    def inputs(self) -> tuple[str, ...]:
        # KRT_NATS_INPUT is the README's form, KRT_NATS_INPUTS (comma separated) KRE's later one.
        subjects = _split(self.text("KRT_NATS_INPUT")) + _split(self.text("KRT_NATS_INPUTS"))
        if not subjects:
            self.problems.append("KRT_NATS_INPUT or KRT_NATS_INPUTS is missing")
        return tuple(dict.fromkeys(subjects))

    def output(self, entrypoint: str) -> str:
        if "KRT_NATS_OUTPUT" not in self.env:
            self.problems.append("KRT_NATS_OUTPUT is missing")
            return ""
        # KRE leaves the last node's output empty: its replies go to the entrypoint.
        output = self.text("KRT_NATS_OUTPUT") or entrypoint
        if not output:
            self.problems.append(
                "KRT_NATS_OUTPUT is empty and KRT_NATS_ENTRYPOINT_SUBJECT is not set"
            )
        return output

    def js_api_prefix(self) -> str:
        # A leaf node or hub reaches another account's JetStream through a domain (nats-py's
        # `domain`: `$JS.<domain>.API`) or an imported API prefix (`prefix`).
        domain = self.text("KRT_NATS_JS_DOMAIN")
        prefix = self.text("KRT_NATS_JS_API_PREFIX").rstrip(".")
        if domain and prefix:
            self.problems.append("set KRT_NATS_JS_DOMAIN or KRT_NATS_JS_API_PREFIX, not both")
        if domain and not re.fullmatch(r"[A-Za-z0-9_-]+", domain):
            self.problems.append(f"KRT_NATS_JS_DOMAIN must be one subject token, got {domain!r}")
        if prefix and any(c in prefix for c in " *>"):
            self.problems.append(f"KRT_NATS_JS_API_PREFIX must be a plain subject, got {prefix!r}")
        if domain:
            return f"$JS.{domain}.API"
        return prefix or "$JS.API"

    def durable(self) -> str:
        durable = self.text("KRT_NATS_DURABLE")
        problem = durable_problem(durable)
        if problem:
            self.problems.append(
                f"KRT_NATS_DURABLE={durable!r} {problem}: JetStream refuses it as a consumer name"
            )
        return durable

    def address(self, name: str) -> str:
        address = self.text(name) or DEFAULT_HANDLER_ADDRESS
        try:
            handler_endpoint(address)
        except ValueError as exc:
            self.problems.append(f"{name}={address!r}: {exc}")
        return address

    def boolean(self, name: str, default: bool) -> bool:
        raw = self.text(name).lower()
        if not raw:
            return default
        if raw in _TRUE:
            return True
        if raw not in _FALSE:
            self.problems.append(f"{name} must be true/false/1/0/yes/no, got {raw!r}")
        return False

    def integer(self, name: str, default: int, minimum: int, maximum: int | None = None) -> int:
        raw = self.text(name)
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            value = minimum - 1
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and <= {maximum}" if maximum is not None else ""
            self.problems.append(f"{name} must be an integer >= {minimum}{upper}, got {raw!r}")
            return default
        return value

    def seconds(
        self, name: str, default: float, minimum: float, maximum: float, zero: str = ""
    ) -> float:
        raw = self.text(name)
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not (minimum <= value <= maximum or (zero and value == 0)):  # NaN fails too
            if zero:
                expected = f"0 ({zero}) or seconds up to {maximum:g}"
            else:
                expected = f"a number of seconds from {minimum:g} to {maximum:g}"
            self.problems.append(f"{name} must be {expected}, got {raw!r}")
            return default
        return value

    def log_format(self) -> str:
        fmt = self.text("KRT_LOG_FORMAT").lower() or "text"
        if fmt not in ("text", "json"):
            self.problems.append(f"KRT_LOG_FORMAT must be text or json, got {fmt!r}")
            return "text"
        return fmt

    def log_level(self) -> str:
        level = self.text("KRT_LOG_LEVEL").upper() or "INFO"
        if level == "WARN":
            level = "WARNING"
        if level not in _LOG_LEVELS:
            allowed = ", ".join(sorted(_LOG_LEVELS))
            self.problems.append(f"KRT_LOG_LEVEL must be one of {allowed}, got {level!r}")
            return "INFO"
        return level
