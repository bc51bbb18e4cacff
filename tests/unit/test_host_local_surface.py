"""What the handler host exposes on the machine: its socket's modes, a public address said.

Whoever can connect to the gRPC socket can run the handler, so the socket and a folder
the host makes for it are for the owner and the group (the sidecar's, via fsGroup) only,
whatever the umask.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from handler_host.context import Context
from handler_host.loader import load_user_code
from handler_host.server import HostServer, start_server
from handler_host.settings import HostSettings

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 000, the case where a socket made with default modes is everyone's."""
    saved = os.umask(0)
    yield
    os.umask(saved)


@asynccontextmanager
async def host_on(
    tmp_path: Path, address: str, allow_public: bool = False
) -> AsyncIterator[HostServer]:
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    (code / "handler.py").write_text("def handler(ctx, data):\n    return None\n")
    host_settings = HostSettings(
        base_path=str(code),
        handler_path="handler.py",
        handler_address=address,
        allow_public=allow_public,
    )
    user_code = load_user_code(host_settings.base_path, host_settings.handler_path)
    host = await start_server(host_settings, user_code, Context(host_settings.base_path))
    try:
        yield host
    finally:
        await host.stop(0)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_the_socket_and_the_folder_made_for_it_are_for_owner_and_group_only(
    tmp_path: Path, open_umask: None
) -> None:
    socket_path = tmp_path / "run" / "kre" / "handler.sock"

    async with host_on(tmp_path, f"unix://{socket_path}"):
        assert socket_path.is_socket()
        assert mode(socket_path) == 0o660
        assert mode(socket_path.parent) == 0o770


async def test_an_existing_folder_is_left_as_it_is_and_the_socket_still_closed(
    tmp_path: Path, open_umask: None
) -> None:
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o750)
    os.chmod(folder, 0o750)
    socket_path = folder / "handler.sock"

    async with host_on(tmp_path, f"unix://{socket_path}"):
        assert mode(socket_path) == 0o660
        assert mode(folder) == 0o750


async def test_a_folder_made_under_a_setgid_folder_keeps_the_shared_group(
    tmp_path: Path, open_umask: None
) -> None:
    # The emptyDir with fsGroup: setgid, so what is made in it gets the pod's group.
    volume = tmp_path / "volume"
    volume.mkdir()
    os.chmod(volume, 0o2777)
    socket_path = volume / "kre" / "handler.sock"

    async with host_on(tmp_path, f"unix://{socket_path}"):
        made = socket_path.parent.stat()
        assert stat.S_IMODE(made.st_mode) == 0o2770
        assert made.st_gid == volume.stat().st_gid == socket_path.stat().st_gid


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "handler_host.server" and r.levelno == logging.WARNING
    ]


async def test_a_public_address_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with host_on(tmp_path, "0.0.0.0:0", allow_public=True):
        pass

    [line] = warnings_of(caplog)
    assert line.startswith(
        "KRT_HANDLER_ALLOW_PUBLIC=true: the handler host listens on 0.0.0.0:0, beyond this "
        "machine, with no authentication or TLS"
    )


@pytest.mark.parametrize("address", ["127.0.0.1:0", "unix://{tmp}/h.sock"])
async def test_a_local_address_is_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, address: str
) -> None:
    async with host_on(tmp_path, address.format(tmp=tmp_path)):
        pass

    assert warnings_of(caplog) == []
