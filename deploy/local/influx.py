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
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from deploy.local.procs import wait_until
from deploy.local.server import LocalServer

INSTALL_HINT = "apt-get update && apt-get install -y victoria-metrics"
# Debian installs it here (`dpkg -L victoria-metrics`); KRT_VICTORIA_METRICS overrides.
DEBIAN_BINARY = "/usr/bin/victoria-metrics"


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


class InfluxServer(LocalServer):
    """``with InfluxServer() as influx:`` starts VictoriaMetrics; ``influx.uri`` takes
    InfluxDB writes (any bucket, org and token)."""

    name = "victoria-metrics"

    def __init__(self) -> None:
        self._binary = find_victoria_metrics()
        super().__init__()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            self._binary,
            f"-httpListenAddr=127.0.0.1:{self.port}",
            f"-storageDataPath={self.data_dir}",
            "-retentionPeriod=100y",  # tests write points with old timestamps
            "-loggerLevel=WARN",
        ]

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=0.5) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

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
