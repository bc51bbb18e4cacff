"""How the sidecar reaches NATS: server URLs, TLS and credentials, read once at start.

One way to authenticate at a time: a `.creds` file (JWT and its NKEY seed), an NKEY
seed file, a user and password, or a token. A user and password (or a token) may also
come in `KRT_NATS_SERVER`'s URL, percent-encoded; they are taken out of the URL before
nats-py sees it, so no URL that reaches a log line or a traceback holds a secret.

TLS is required as soon as a `tls://` URL or any `KRT_NATS_TLS_*` file is given. nats-py
alone would then still send CONNECT, password included, in clear to a server that does
not offer TLS: `TlsRequiredClient` refuses such a server before a byte is sent to it.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import nats.errors
from nats.aio.client import Client

# The TLS and credential files: mounted into the sidecar only, from Secrets (docs/deploy.md).
FILE_VARIABLES = (
    "KRT_NATS_TLS_CA_FILE",
    "KRT_NATS_TLS_CERT_FILE",
    "KRT_NATS_TLS_KEY_FILE",
    "KRT_NATS_CREDS_FILE",
    "KRT_NATS_NKEY_SEED_FILE",
)
_SCHEMES = ("nats", "tls", "ws", "wss")


class PlaintextServerError(nats.errors.Error):
    """A server offered no TLS to a client that requires it. Nothing was sent to it.

    A nats-py error, so that nats-py treats it as a failed attempt on that server and
    tries the next one (or this one again later) without ever writing CONNECT.
    """

    def __init__(self, server: str) -> None:
        self.server = server
        super().__init__()

    def __str__(self) -> str:
        return (
            f"NATS server {self.server} offers no TLS, but TLS is required (a tls:// URL or "
            "a KRT_NATS_TLS_* file is set): nothing was sent to it, credentials included. "
            "Enable TLS on the server, or point KRT_NATS_SERVER at one that has it"
        )


@dataclass(frozen=True, repr=False)
class NatsSecurity:
    """TLS and credentials for the NATS connection. `repr` and `describe` hold no secret."""

    tls_required: bool = False
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    creds_file: str = ""
    nkey_seed_file: str = ""
    user: str = ""
    password: str = ""
    token: str = ""

    @property
    def auth_method(self) -> str:
        if self.creds_file:
            return "creds"
        if self.nkey_seed_file:
            return "nkey"
        if self.user:
            return "user/password"
        if self.token:
            return "token"
        return "none"

    def describe(self) -> str:
        """`auth=... tls=...` for the start-up log line: the method, never a secret."""
        if not self.tls_required:
            tls = "off"
        else:
            tls = "custom-ca" if self.tls_ca_file else "system-ca"
            if self.tls_cert_file:
                tls += "+client-cert"
        return f"auth={self.auth_method} tls={tls}"

    def __repr__(self) -> str:
        return f"NatsSecurity({self.describe()})"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client's TLS context (files read now), or None when TLS is not required."""
        if not self.tls_required:
            return None
        context = ssl.create_default_context(cafile=self.tls_ca_file or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.tls_cert_file:
            context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        return context

    def connect_options(self) -> dict[str, Any]:
        """nats-py `connect()` keyword arguments for TLS and authentication."""
        options: dict[str, Any] = {}
        context = self.ssl_context()
        if context is not None:
            options["tls"] = context
        if self.creds_file:
            options["user_credentials"] = self.creds_file
        elif self.nkey_seed_file:
            options["nkeys_seed"] = self.nkey_seed_file
        elif self.user:
            options["user"] = self.user
            options["password"] = self.password
        elif self.token:
            options["token"] = self.token
        return options

    def client(self) -> Client:
        """A nats-py client that never talks to a plaintext server when TLS is required."""
        return TlsRequiredClient() if self.tls_required else Client()


class TlsRequiredClient(Client):
    """nats-py's client, refusing a server whose INFO offers no TLS.

    Works around nats-py 2.16 (pinned <3), which upgrades to TLS only when the server's
    INFO says `tls_required`, whatever the URL's scheme or the `tls=` context: against a
    plaintext server it writes CONNECT, password included, in clear. The one override of
    a nats-py internal in the project, kept to this method because no public option
    prevents the leak on every connect and reconnect; tests/integration/test_nats_auth.py
    fails once nats-py refuses such a server itself. INFO is the first thing a server sends and
    CONNECT the first thing a client writes, so checking INFO here is early enough.
    A server that offers TLS without requiring it (`allow_non_tls`) is upgraded.
    """

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        if initial_connection and not info.get("tls_required"):
            server = self._current_server
            scheme = server.uri.scheme if server is not None else ""
            if scheme != "wss":  # a wss:// connection is TLS from its first byte
                if not info.get("tls_available"):
                    where = f"{server.uri.hostname}:{server.uri.port}" if server else "?"
                    raise PlaintextServerError(where)
                info["tls_required"] = True  # nats-py then upgrades before CONNECT
        await super()._process_info(info, initial_connection)


def read_nats(env: Mapping[str, str]) -> tuple[tuple[str, ...], NatsSecurity, list[str]]:
    """(server URLs without credentials, security, problems) from the environment."""
    problems: list[str] = []
    raw_servers = env.get("KRT_NATS_SERVER", "").strip()
    servers, url_user, url_password = _parse_servers(raw_servers, problems)
    files = {name: env.get(name, "").strip() for name in FILE_VARIABLES}
    problems += [
        f"{name}={path!r} is not a readable file"
        for name, path in files.items()
        if path and not (os.path.isfile(path) and os.access(path, os.R_OK))
    ]
    # The password and the token are used exactly as given, spaces included.
    user = env.get("KRT_NATS_USER", "").strip()
    password, token = env.get("KRT_NATS_PASSWORD", ""), env.get("KRT_NATS_TOKEN", "")
    problems += _auth_problems(files, user, password, token, url_user is not None)
    if url_user is not None and url_password is None:
        token = url_user  # nats://TOKEN@host, as nats-py reads it
    elif url_user is not None:
        user, password = url_user, url_password or ""
    tls_required = any(files[name] for name in FILE_VARIABLES[:3]) or any(
        url.startswith(("tls://", "wss://")) for url in servers
    )
    if tls_required and any(url.startswith("ws://") for url in servers):
        problems.append("KRT_NATS_SERVER: TLS is required, so use wss:// instead of ws://")
    security = NatsSecurity(
        tls_required=tls_required,
        tls_ca_file=files["KRT_NATS_TLS_CA_FILE"],
        tls_cert_file=files["KRT_NATS_TLS_CERT_FILE"],
        tls_key_file=files["KRT_NATS_TLS_KEY_FILE"],
        creds_file=files["KRT_NATS_CREDS_FILE"],
        nkey_seed_file=files["KRT_NATS_NKEY_SEED_FILE"],
        user=user,
        password=password,
        token=token,
    )
    if not problems:
        problems += _check_files(security)
    return servers, security, problems


def _auth_problems(
    files: Mapping[str, str], user: str, password: str, token: str, in_url: bool
) -> list[str]:
    problems = []
    if user and not password:
        problems.append("KRT_NATS_USER is set without KRT_NATS_PASSWORD")
    if password and not user:
        problems.append("KRT_NATS_PASSWORD is set without KRT_NATS_USER")
    if bool(files["KRT_NATS_TLS_CERT_FILE"]) != bool(files["KRT_NATS_TLS_KEY_FILE"]):
        problems.append("KRT_NATS_TLS_CERT_FILE and KRT_NATS_TLS_KEY_FILE go together (mutual TLS)")
    given = {
        "KRT_NATS_CREDS_FILE": files["KRT_NATS_CREDS_FILE"],
        "KRT_NATS_NKEY_SEED_FILE": files["KRT_NATS_NKEY_SEED_FILE"],
        "KRT_NATS_USER/KRT_NATS_PASSWORD": user or password,
        "KRT_NATS_TOKEN": token,
        "credentials in KRT_NATS_SERVER": in_url,
    }
    methods = [name for name, value in given.items() if value]
    if len(methods) > 1:
        problems.append("set one way to authenticate to NATS, not " + " and ".join(methods))
    return problems


def _check_files(security: NatsSecurity) -> list[str]:
    """Load what nats-py would load at connect time, so a bad file stops the start."""
    problems: list[str] = []
    try:
        security.ssl_context()
    except (OSError, ssl.SSLError) as exc:
        problems.append(f"the KRT_NATS_TLS_* files cannot be loaded: {exc}")
    if security.creds_file or security.nkey_seed_file:
        try:
            import nkeys  # noqa: F401  (nats-py imports it when connecting)
        except ImportError:
            problems.append("NKEY and .creds authentication need the nkeys package")
    if security.nkey_seed_file:
        problems += _check_seed_file(security.nkey_seed_file)
    if security.creds_file:
        with open(security.creds_file, "rb") as f:
            content = f.read()
        if b"BEGIN NATS USER JWT" not in content or b"BEGIN USER NKEY SEED" not in content:
            problems.append(
                f"KRT_NATS_CREDS_FILE={security.creds_file!r} is not a .creds file "
                "(a user JWT and its NKEY seed, as `nsc generate creds` writes it)"
            )
    return problems


def _check_seed_file(path: str) -> list[str]:
    try:
        import nkeys
    except ImportError:
        return []
    with open(path, "rb") as f:
        seed = bytearray(f.read().strip())
    try:
        nkeys.from_seed(seed).wipe()
    except Exception:  # nkeys raises its own error classes, or binascii's
        return [f"KRT_NATS_NKEY_SEED_FILE={path!r} does not hold an NKEY seed (SU...)"]
    return []


def _parse_servers(raw: str, problems: list[str]) -> tuple[tuple[str, ...], str | None, str | None]:
    """Server URLs without their userinfo, and the (percent-decoded) user and password.

    A URL's userinfo ends at the last `@`, so a password may hold `@`, `/`, `?` or `#`
    as they are; only `,` (it separates servers) and `%` must be percent-encoded.
    """
    if not raw:
        problems.append("KRT_NATS_SERVER is missing")
        return (), None, None
    urls: list[str] = []
    userinfos: set[str | None] = set()
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    for number, part in enumerate(parts, 1):
        url, userinfo, problem = _parse_server(part)
        if not problem:
            urls.append(url)
            userinfos.add(userinfo)
        elif "@" in raw:
            # A raw ',' in a password splits it across two "URLs": show none of them.
            problems.append(
                f"KRT_NATS_SERVER: URL {number} of {len(parts)} {problem} (not shown: the "
                "value holds credentials; percent-encode ',' and '%' in them as %2C and %25)"
            )
        else:
            problems.append(f"KRT_NATS_SERVER: {part!r} {problem}")
    if len(userinfos) > 1:
        problems.append("KRT_NATS_SERVER: give every URL the same credentials, or none")
        return tuple(urls), None, None
    userinfo = next(iter(userinfos), None)
    if userinfo is None:
        return tuple(urls), None, None
    user, sep, password = userinfo.partition(":")
    return tuple(urls), unquote(user), (unquote(password) if sep else None)


def _parse_server(part: str) -> tuple[str, str | None, str]:
    """(URL without userinfo, userinfo, problem) of one server; problem is "" when fine."""
    scheme, sep, rest = part.partition("://")
    if not sep:
        scheme, rest = "nats", part  # nats-py's bare HOST[:PORT]
    if scheme not in _SCHEMES:
        return "", None, f"has the scheme {scheme!r}, expected one of {', '.join(_SCHEMES)}"
    userinfo, at, hostport = rest.rpartition("@")
    hostport = hostport.removesuffix("/")
    host, colon, port = (
        hostport.rpartition(":") if not hostport.endswith("]") else (hostport, "", "")
    )
    if not colon:
        host, port = hostport, ""
    if not host or any(c in host for c in "/?#@ "):
        return "", None, "has no host: expected nats://HOST:PORT or tls://HOST:PORT"
    if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        return "", None, "has an invalid port"
    if at and not userinfo:
        return "", None, "has an empty user before '@'"
    return f"{scheme}://{hostport}", (userinfo if at else None), ""
