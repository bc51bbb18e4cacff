"""NATS TLS and credentials, each against a real nats-server configured for it.

The certificates (a throwaway CA, a server and a client certificate), the NKEYs and the
JWTs of the `.creds` test are made here. The connection is built exactly as the sidecar
builds it: `read_nats` from the environment, then `NatsSecurity.client()` and
`connect_options()`. A fake server that offers no TLS records what a client sends it.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import nats.errors
import nkeys
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from nats.aio.client import Client

from deploy.local.nats import NatsServer
from sidecar.connection import PlaintextServerError, read_nats
from sidecar.main import Sidecar
from sidecar.settings import SidecarSettings
from tests.waiting import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

# Every character a URL or a server list treats specially.
PASSWORD = "p@ss/w#rd?,% :x"


# --- the throwaway PKI -------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    folder: Path,
    stem: str,
    subject: str,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    server: bool = False,
) -> tuple[x509.Name, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_name, issuer_key = issuer or (_name(subject), key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if issuer is not None:
        usage = x509.oid.ExtendedKeyUsageOID
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([usage.SERVER_AUTH if server else usage.CLIENT_AUTH]),
            critical=False,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{stem}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return _name(subject), key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = _certificate(folder, "ca", "kre test CA", None)
    _certificate(folder, "server", "localhost", ca, server=True)
    _certificate(folder, "client", "kre-sidecar", ca)
    return Pki(
        folder / "ca.crt",
        folder / "server.crt",
        folder / "server.key",
        folder / "client.crt",
        folder / "client.key",
    )


# --- NKEYs and JWTs -------------------------------------------------------------


def keypair(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def jwt(issuer: nkeys.KeyPair, subject: str, name: str, claims: dict[str, object]) -> str:
    """A NATS JWT (v2): ed25519-nkey, signed by `issuer`."""
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = {
        "jti": _b64(os.urandom(24)).upper(),
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "sub": subject,
        "name": name,
        "nats": {**claims, "version": 2},
    }
    payload = _b64(json.dumps(body).encode())
    signature = _b64(issuer.sign(f"{header}.{payload}".encode()))
    return f"{header}.{payload}.{signature}"


def creds_file(path: Path, user_jwt: str, user_seed: bytes) -> Path:
    path.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user_seed.decode()}\n"
        "------END USER NKEY SEED------\n"
    )
    return path


# --- servers -----------------------------------------------------------------------


def tls_block(pki: Pki, verify: bool = False, extra: str = "") -> str:
    client_ca = f'ca_file: "{pki.ca}"\n  verify: true\n' if verify else ""
    return (
        f'tls {{\n  cert_file: "{pki.server_cert}"\n  key_file: "{pki.server_key}"\n'
        f"  {client_ca}}}\n{extra}"
    )


@pytest.fixture(scope="module")
def server() -> Iterator[Callable[..., NatsServer]]:
    started: list[NatsServer] = []

    def start(config: str, jetstream: bool = False) -> NatsServer:
        nats_server = NatsServer(config=config, jetstream=jetstream).start()
        started.append(nats_server)
        return nats_server

    yield start
    for nats_server in started:
        nats_server.close()


BASE_ENV = {
    "KRT_NODE_NAME": "auth-node",
    "KRT_NATS_INPUT": "auth.in",
    "KRT_NATS_OUTPUT": "auth.out",
    "KRT_NATS_STREAM": "auth",
}


async def connect(url: str, **env: str) -> Client:
    """Connect as the sidecar does; fail at once instead of retrying."""
    servers, security, problems = read_nats({"KRT_NATS_SERVER": url, **env})
    assert not problems, problems
    nc = security.client()
    await nc.connect(
        servers=list(servers),
        allow_reconnect=False,
        connect_timeout=3,
        **security.connect_options(),
    )
    return nc


async def round_trip(nc: Client) -> None:
    sub = await nc.subscribe("auth.check")
    await nc.publish("auth.check", b"ok")
    message = await sub.next_msg(timeout=3)
    assert message.data == b"ok"
    await nc.close()


def is_tls(nc: Client) -> bool:
    # nats-py keeps the asyncio writer of its transport; the ssl object says TLS is on.
    writer = nc._transport._io_writer  # type: ignore[union-attr]
    return writer.get_extra_info("ssl_object") is not None


async def refused(url: str, **env: str) -> BaseException:
    with pytest.raises((nats.errors.Error, OSError, asyncio.TimeoutError)) as info:
        nc = await connect(url, **env)
        await nc.close()
    return info.value


# --- each way to authenticate ---------------------------------------------------------


async def test_user_and_password(server: Callable[..., NatsServer]) -> None:
    nats_server = server(f"authorization {{ user: kre, password: {json.dumps(PASSWORD)} }}")
    await round_trip(
        await connect(nats_server.url, KRT_NATS_USER="kre", KRT_NATS_PASSWORD=PASSWORD)
    )
    error = await refused(nats_server.url, KRT_NATS_USER="kre", KRT_NATS_PASSWORD="wrong")
    assert "Authorization Violation" in str(error)


async def test_percent_encoded_password_in_the_url(server: Callable[..., NatsServer]) -> None:
    nats_server = server(f"authorization {{ user: kre, password: {json.dumps(PASSWORD)} }}")
    encoded = "p%40ss%2Fw%23rd%3F%2C%25%20%3Ax"
    url = f"nats://kre:{encoded}@127.0.0.1:{nats_server.port}"
    await round_trip(await connect(url))


async def test_token(server: Callable[..., NatsServer]) -> None:
    nats_server = server('authorization { token: "t0ken/with@odd,chars" }')
    await round_trip(await connect(nats_server.url, KRT_NATS_TOKEN="t0ken/with@odd,chars"))
    error = await refused(nats_server.url, KRT_NATS_TOKEN="wrong")
    assert "Authorization Violation" in str(error)


async def test_nkey_seed_file(server: Callable[..., NatsServer], tmp_path: Path) -> None:
    user = keypair(nkeys.PREFIX_BYTE_USER)
    nats_server = server(f'authorization {{ users: [ {{ nkey: "{user.public_key.decode()}" }} ] }}')
    seed = tmp_path / "user.nk"
    seed.write_bytes(user.seed + b"\n")
    await round_trip(await connect(nats_server.url, KRT_NATS_NKEY_SEED_FILE=str(seed)))
    other = tmp_path / "other.nk"
    other.write_bytes(keypair(nkeys.PREFIX_BYTE_USER).seed)
    error = await refused(nats_server.url, KRT_NATS_NKEY_SEED_FILE=str(other))
    assert "Authorization Violation" in str(error)


async def test_creds_file_with_an_operator_and_jwt_accounts(
    server: Callable[..., NatsServer], tmp_path: Path
) -> None:
    operator = keypair(nkeys.PREFIX_BYTE_OPERATOR)
    account = keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    user = keypair(nkeys.PREFIX_BYTE_USER)
    operator_pub, account_pub = operator.public_key.decode(), account.public_key.decode()
    unlimited = {"subs": -1, "data": -1, "payload": -1, "conn": -1}
    account_jwt = jwt(
        operator,
        account_pub,
        "kre",
        {
            "type": "account",
            "limits": {**unlimited, "imports": -1, "exports": -1, "wildcards": True, "leaf": -1},
        },
    )
    config = (
        f'operator: "{jwt(operator, operator_pub, "test-operator", {"type": "operator"})}"\n'
        "resolver: MEMORY\n"
        f'resolver_preload: {{ {account_pub}: "{account_jwt}" }}\n'
    )
    nats_server = server(config)
    user_jwt = jwt(
        account,
        user.public_key.decode(),
        "sidecar",
        {"type": "user", **unlimited, "pub": {}, "sub": {}},
    )
    creds = creds_file(tmp_path / "user.creds", user_jwt, user.seed)
    await round_trip(await connect(nats_server.url, KRT_NATS_CREDS_FILE=str(creds)))
    # The same JWT with another user's seed cannot sign the server's nonce.
    stolen = creds_file(tmp_path / "stolen.creds", user_jwt, keypair(nkeys.PREFIX_BYTE_USER).seed)
    error = await refused(nats_server.url, KRT_NATS_CREDS_FILE=str(stolen))
    assert "Authorization Violation" in str(error)


# --- TLS -------------------------------------------------------------------------------


async def test_tls_with_a_private_ca(server: Callable[..., NatsServer], pki: Pki) -> None:
    nats_server = server(tls_block(pki))
    url = f"tls://127.0.0.1:{nats_server.port}"
    nc = await connect(url, KRT_NATS_TLS_CA_FILE=str(pki.ca))
    assert is_tls(nc)
    await round_trip(nc)
    # Without the CA, the server's certificate is not trusted: no fallback to anything.
    error = await refused(url)
    assert "CERTIFICATE_VERIFY_FAILED" in str(error) or isinstance(error, ssl.SSLError)


async def test_mutual_tls_with_user_and_password(
    server: Callable[..., NatsServer], pki: Pki
) -> None:
    auth = f"authorization {{ user: kre, password: {json.dumps(PASSWORD)} }}"
    nats_server = server(tls_block(pki, verify=True, extra=auth))
    files = {
        "KRT_NATS_TLS_CA_FILE": str(pki.ca),
        "KRT_NATS_TLS_CERT_FILE": str(pki.client_cert),
        "KRT_NATS_TLS_KEY_FILE": str(pki.client_key),
    }
    # A nats:// URL: the TLS files alone make TLS required.
    nc = await connect(nats_server.url, **files, KRT_NATS_USER="kre", KRT_NATS_PASSWORD=PASSWORD)
    assert is_tls(nc)
    await round_trip(nc)
    # Without a client certificate the server refuses the handshake.
    await refused(nats_server.url, KRT_NATS_TLS_CA_FILE=str(pki.ca))


async def test_tls_is_used_when_the_server_only_offers_it(
    server: Callable[..., NatsServer], pki: Pki
) -> None:
    nats_server = server(tls_block(pki, extra="allow_non_tls: true\n"))
    nc = await connect(nats_server.url, KRT_NATS_TLS_CA_FILE=str(pki.ca))
    assert is_tls(nc)
    await round_trip(nc)


async def test_tls_url_against_a_real_server_without_tls(server: Callable[..., NatsServer]) -> None:
    nats_server = server(f"authorization {{ user: kre, password: {json.dumps(PASSWORD)} }}")
    url = f"tls://127.0.0.1:{nats_server.port}"
    error = await refused(url, KRT_NATS_USER="kre", KRT_NATS_PASSWORD=PASSWORD)
    assert isinstance(error, PlaintextServerError)
    assert f"127.0.0.1:{nats_server.port} offers no TLS" in str(error)


# --- a server that offers no TLS, recording what it is sent ------------------------


class RecordingServer:
    """Speaks just enough NATS (INFO, PONG) and keeps every byte a client sends."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> RecordingServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info = {
            "server_id": "fake",
            "version": "2.10.0",
            "proto": 1,
            "headers": True,
            "max_payload": 1048576,
            "auth_required": True,
        }
        writer.write(f"INFO {json.dumps(info)}\r\n".encode())
        await writer.drain()
        while line := await reader.readline():
            self.received += line
            if line.startswith(b"PING"):
                writer.write(b"PONG\r\n")
                await writer.drain()
        self.closed += 1
        writer.close()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def plaintext() -> AsyncIterator[RecordingServer]:
    fake = await RecordingServer().start()
    yield fake
    await fake.close()


async def test_nats_py_alone_sends_the_password_in_clear_despite_tls(
    plaintext: RecordingServer, pki: Pki
) -> None:
    # Why TlsRequiredClient exists. When this fails, nats-py refuses a plaintext server
    # itself once given a TLS context, and the subclass can go.
    nc = Client()
    await nc.connect(
        servers=[f"tls://127.0.0.1:{plaintext.port}"],
        tls=ssl.create_default_context(cafile=str(pki.ca)),
        user="kre",
        password=PASSWORD,
        allow_reconnect=False,
        connect_timeout=3,
    )
    await nc.close()
    assert json.dumps(PASSWORD).encode() in plaintext.received


@pytest.mark.parametrize(
    "auth",
    [
        {"KRT_NATS_USER": "kre", "KRT_NATS_PASSWORD": PASSWORD},
        {"KRT_NATS_TOKEN": PASSWORD},
    ],
)
async def test_a_server_without_tls_gets_nothing(
    plaintext: RecordingServer, pki: Pki, auth: Mapping[str, str]
) -> None:
    url = f"nats://127.0.0.1:{plaintext.port}"
    servers, security, problems = read_nats(
        {"KRT_NATS_SERVER": url, "KRT_NATS_TLS_CA_FILE": str(pki.ca), **auth}
    )
    assert not problems
    nc = security.client()
    with pytest.raises(PlaintextServerError) as info:
        await nc.connect(servers=list(servers), allow_reconnect=False, **security.connect_options())
    await nc.close()
    await eventually(lambda: plaintext.closed == 1, 10, "the client hung up")
    assert plaintext.received == b"", "a client requiring TLS wrote to a plaintext server"
    assert "offers no TLS" in str(info.value) and PASSWORD not in str(info.value)


async def test_the_sidecar_says_it_once_and_never_logs_the_password(
    plaintext: RecordingServer, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    encoded = "p%40ss%2Fw%23rd%3F%2C%25%20%3Ax"
    env = {
        **BASE_ENV,
        "KRT_NATS_SERVER": f"tls://kre:{encoded}@127.0.0.1:{plaintext.port}",
        "KRT_NATS_TLS_CA_FILE": str(pki.ca),
        "KRT_HANDLER_ADDRESS": f"unix://{tmp_path}/handler.sock",
        "KRT_HTTP_HOST": "127.0.0.1",
        "KRT_HTTP_PORT": "0",
    }
    settings = SidecarSettings.from_env(env)
    assert PASSWORD not in repr(settings) and encoded not in repr(settings)
    sidecar = Sidecar(settings)
    caplog.set_level(logging.DEBUG)
    starting = asyncio.create_task(sidecar.start())
    try:
        await eventually(
            lambda: any("offers no TLS" in r.getMessage() for r in caplog.records),
            20,
            "the sidecar logged the refusal",
        )
        await eventually(lambda: plaintext.closed >= 2, 20, "a second attempt was refused too")
    finally:
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await sidecar.stop()
    refusals = [r for r in caplog.records if "offers no TLS" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.ERROR
    assert plaintext.received == b""
    for secret in (PASSWORD, encoded, "p@ss"):
        assert secret not in caplog.text
