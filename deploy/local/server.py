"""What the local test servers share: a temp folder, a free port, start-until-it-answers.

A subclass names itself, says how to spawn its process (`command()`) and how to tell
that it answers (`answers()`); this class picks the port (retrying when one was taken
between picking and binding it), waits with a deadline, stops by PID and cleans up.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

from deploy.local.procs import free_port, stop_process, wait_until

START_ATTEMPTS = 3  # a free port can be taken between picking it and binding it


class LocalServer:
    """``with Server() as s:`` starts it; ``stop()`` then ``start()`` keeps port and data;
    ``close()`` (or leaving the ``with``) stops it and removes its temporary folder."""

    name = "server"

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=f"kre-{self.name}-")
        self.base = Path(self._tmp.name)
        self.data_dir = self.base / "data"
        self.data_dir.mkdir()
        self.log_path = self.base / f"{self.name}.log"
        self.port = -1
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def answers(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 20.0) -> Self:
        """Start and wait until it answers; a new port is tried if one was taken."""
        fixed_port = self.port != -1
        for attempt in range(1, START_ATTEMPTS + 1):
            if not fixed_port:
                self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_until(self.answers, timeout, f"{self.name} answers", self.proc)
                return self
            except TimeoutError:
                self.stop()
                raise
            except RuntimeError:  # exited early: most likely the port was taken
                self.proc = None
                if fixed_port or attempt == START_ATTEMPTS:
                    raise RuntimeError(self._exit_message()) from None
        raise AssertionError("unreachable")

    def _exit_message(self) -> str:
        try:
            tail = self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            tail = ""
        return f"{self.name} exited before answering on 127.0.0.1:{self.port}; its log:\n{tail}"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server by its PID (SIGTERM, then SIGKILL after ``timeout``)."""
        stop_process(self.proc, timeout)
        self.proc = None

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> Self:
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
