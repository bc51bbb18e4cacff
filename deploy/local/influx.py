"""An InfluxDB write endpoint on 127.0.0.1 for the tests and the demo, no Docker.

Debian's ``victoria-metrics`` accepts the InfluxDB ``/api/v2/write`` line protocol
that ``influxdb-client`` speaks (Debian's own ``influxdb`` 1.6 answers it with 404).
It stores each numeric or bool field as a series named ``<measurement>_<field>``
with the point's tags as labels; ``export`` reads them back through
``/api/v1/export``. What it does not keep is written down in docs/stores.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from deploy.local.procs import free_port, stop_process, wait_until

INSTALL_HINT = "apt-get update && apt-get install -y victoria-metrics"
# Debian installs it here (`dpkg -L victoria-metrics`); KRT_VICTORIA_METRICS overrides.
DEBIAN_BINARY = "/usr/bin/victoria-metrics"
_START_ATTEMPTS = 3


class VictoriaMetricsNotInstalled(FileNotFoundError):
    def __init__(self) -> None:
        super().__init__(
            "victoria-metrics is not installed (needed as the local InfluxDB write "
            f"endpoint); install the Debian package: {INSTALL_HINT}, or set "
            "KRT_VICTORIA_METRICS to its binary"
        )


def find_victoria_metrics() -> str:
    """Path of the victoria-metrics binary; raises with the install command if missing."""
    candidates = [os.environ.get("KRT_VICTORIA_METRICS", ""), DEBIAN_BINARY]
    candidates.append(shutil.which("victoria-metrics") or "")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise VictoriaMetricsNotInstalled()


@dataclass(frozen=True)
class Series:
    """One exported series: ``name`` is ``<measurement>_<field>``, ``labels`` the tags."""

    name: str
    labels: dict[str, str]
    values: list[float] = field(default_factory=list)
    timestamps_ms: list[int] = field(default_factory=list)


def export_series(base_url: str, match: str, timeout: float = 10.0) -> list[Series]:
    """The series matching a selector (``{__name__=~"cpu_.*"}``), flushed first.

    VictoriaMetrics keeps fresh samples in memory for about a second; the
    ``/internal/force_flush`` call makes everything written so far readable now.
    """
    with urllib.request.urlopen(f"{base_url}/internal/force_flush", timeout=timeout) as resp:
        resp.read()
    query = urllib.parse.urlencode({"match[]": match})
    with urllib.request.urlopen(f"{base_url}/api/v1/export?{query}", timeout=timeout) as resp:
        body = resp.read().decode()
    found = []
    for line in body.splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        labels = dict(item["metric"])
        name = labels.pop("__name__")
        found.append(Series(name, labels, list(item["values"]), list(item["timestamps"])))
    return sorted(found, key=lambda s: (s.name, sorted(s.labels.items())))


class InfluxServer:
    """``with InfluxServer() as influx:`` starts VictoriaMetrics; ``influx.uri`` takes
    InfluxDB writes (any bucket, org and token).

    ``stop()`` then ``start()`` brings it back on the same port with the same data;
    ``close()`` (or leaving the ``with``) stops it and removes its temporary folder.
    """

    def __init__(self) -> None:
        self._binary = find_victoria_metrics()
        self._tmp = tempfile.TemporaryDirectory(prefix="kre-influx-")
        base = Path(self._tmp.name)
        self.data_dir = base / "data"
        self.log_path = base / "victoria-metrics.log"
        self.port = -1
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> InfluxServer:
        """Start and wait until ``/health`` answers OK; a new port is tried if one was taken."""
        fixed_port = self.port != -1
        for attempt in range(1, _START_ATTEMPTS + 1):
            if not fixed_port:
                self.port = free_port()
            self._spawn()
            try:
                wait_until(self._healthy, timeout, "victoria-metrics answers /health", self.proc)
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
        cmd = [
            self._binary,
            f"-httpListenAddr=127.0.0.1:{self.port}",
            f"-storageDataPath={self.data_dir}",
            "-retentionPeriod=100y",  # tests write points with old timestamps
            "-loggerLevel=WARN",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=0.5) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def _exit_message(self) -> str:
        try:
            tail = self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            tail = ""
        return f"victoria-metrics exited before answering on 127.0.0.1:{self.port}:\n{tail}"

    def export(self, match: str) -> list[Series]:
        """``export_series`` on this server: what is readable right now."""
        return export_series(self.uri, match)

    def wait_for_series(
        self, match: str, count: int = 1, samples: int = 0, timeout: float = 10.0
    ) -> list[Series]:
        """Poll ``export`` until ``count`` series (and ``samples`` values in all) match.

        Even after a forced flush, a sample takes about a second to become readable.
        """
        found: list[Series] = []

        def enough() -> bool:
            nonlocal found
            found = self.export(match)
            return len(found) >= count and sum(len(x.values) for x in found) >= samples

        what = f"{count} series with {samples} samples match {match}"
        wait_until(enough, timeout, what, self.proc, interval=0.05)
        return found

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server by its PID (SIGTERM, then SIGKILL after ``timeout``)."""
        stop_process(self.proc, timeout)
        self.proc = None

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> InfluxServer:
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
