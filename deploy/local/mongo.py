"""A MongoDB wire-protocol server on 127.0.0.1 for the tests and the demo, no Docker.

No ``mongod`` can be installed here, so this runs ``nx-27017`` (PyPI), a MongoDB
wire-protocol server on SQLite, as a subprocess. What it does not cover (auth,
unknown commands answered with ok) is written down in docs/stores.md.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from pymongo import MongoClient
from pymongo.errors import PyMongoError

from deploy.local.procs import free_port, stop_process, venv_bin, wait_until

_START_ATTEMPTS = 3  # a free port can be taken between picking it and binding it


class MongoServer:
    """``with MongoServer() as mongo:`` starts nx-27017; ``mongo.uri`` is where to connect.

    ``stop()`` then ``start()`` brings it back on the same port with the same data;
    ``close()`` (or leaving the ``with``) stops it and removes its temporary folder.
    """

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="kre-mongo-")
        base = Path(self._tmp.name)
        self.data_dir = base / "data"
        self.data_dir.mkdir()
        self.log_path = base / "nx-27017.log"
        self._pid_path = base / "nx-27017.pid"
        self.port = -1
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def start(self, timeout: float = 20.0) -> MongoServer:
        """Start and wait until it answers ``ping``; a new port is tried if one was taken."""
        fixed_port = self.port != -1
        for attempt in range(1, _START_ATTEMPTS + 1):
            if not fixed_port:
                self.port = free_port()
            self._spawn()
            try:
                wait_until(self._answers, timeout, "nx-27017 answers ping", self.proc)
                return self
            except TimeoutError:
                self.stop()
                raise
            except RuntimeError:  # exited early: most likely the port was taken
                self.proc = None
                if fixed_port or attempt == _START_ATTEMPTS:
                    raise RuntimeError(self._exit_message()) from None
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        try:
            binary = venv_bin("nx-27017")
        except FileNotFoundError:
            raise FileNotFoundError(
                "nx-27017 is not installed in this venv: .venv/bin/pip install nx-27017"
            ) from None
        cmd = [
            binary,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--log-file",
            str(self.log_path),
            "--pid-file",
            str(self._pid_path),
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def _answers(self) -> bool:
        client: MongoClient[dict[str, object]] = MongoClient(
            self.uri, serverSelectionTimeoutMS=300, connectTimeoutMS=300, timeoutMS=1000
        )
        try:
            client.admin.command("ping")
            return True
        except PyMongoError:
            return False
        finally:
            client.close()

    def _exit_message(self) -> str:
        try:
            tail = self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            tail = ""
        return f"nx-27017 exited before answering on 127.0.0.1:{self.port}; its log:\n{tail}"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server by its PID (SIGTERM, then SIGKILL after ``timeout``)."""
        stop_process(self.proc, timeout)
        self.proc = None

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> MongoServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
