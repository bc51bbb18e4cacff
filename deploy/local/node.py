"""One KRE node run locally: the handler host and the sidecar as real subprocesses.

The same launcher serves `make demo`, the end-to-end tests and the benchmark.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from deploy.local.procs import free_port, stop_process, venv_bin, wait_until
from sidecar.settings import default_dlq_subject


@dataclass
class NodeConfig:
    """The KRT_* environment of one node. `extra` adds or overrides variables."""

    nats_url: str
    stream: str
    base_path: Path
    handler_path: str
    node_name: str = "greeter"
    input_subject: str = ""
    output_subject: str = ""
    entrypoint_subject: str = ""
    workflow: str = "demo"
    version_id: str = "v1-id"
    version: str = "v1"
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.input_subject = self.input_subject or f"{self.stream}.{self.node_name}.in"
        self.output_subject = self.output_subject or f"{self.stream}.{self.node_name}.out"
        self.entrypoint_subject = self.entrypoint_subject or f"{self.stream}.entrypoint"

    @property
    def subjects(self) -> list[str]:
        """What the node's stream must capture."""
        return [
            self.input_subject,
            self.output_subject,
            self.entrypoint_subject,
            self.dlq_subject,
        ]

    @property
    def dlq_subject(self) -> str:
        """The sidecar's default dead-letter subject for this node, unless `extra` sets one."""
        default = default_dlq_subject(self.output_subject, self.stream, self.node_name)
        return self.extra.get("KRT_NATS_DLQ_SUBJECT", default)

    def env(self, socket_path: Path, http_port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KRT_")}
        env.setdefault("MALLOC_ARENA_MAX", "2")  # as both images set it
        env.update(
            {
                "KRT_WORKFLOW_NAME": self.workflow,
                "KRT_VERSION_ID": self.version_id,
                "KRT_VERSION": self.version,
                "KRT_NODE_NAME": self.node_name,
                "KRT_NATS_SERVER": self.nats_url,
                "KRT_NATS_INPUT": self.input_subject,
                "KRT_NATS_OUTPUT": self.output_subject,
                "KRT_NATS_STREAM": self.stream,
                "KRT_NATS_ENTRYPOINT_SUBJECT": self.entrypoint_subject,
                "KRT_BASE_PATH": str(self.base_path),
                "KRT_HANDLER_PATH": self.handler_path,
                "KRT_HANDLER_ADDRESS": f"unix://{socket_path}",
                "KRT_HTTP_PORT": str(http_port),
                "KRT_HTTP_HOST": "127.0.0.1",
                "KRT_METRICS_PORT": "0",  # several hosts share this machine: no fixed port
            }
        )
        env.update(self.extra)
        return env


class LocalNode:
    """Both containers of a KRE pod, as two local processes sharing a Unix socket."""

    def __init__(self, config: NodeConfig, run_dir: Path | None = None) -> None:
        self.config = config
        self._tmp = None if run_dir else tempfile.TemporaryDirectory(prefix="kre-node-")
        self.run_dir = run_dir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.socket_path = self.run_dir / "handler.sock"
        self.http_port = free_port()
        self.host: subprocess.Popen[bytes] | None = None
        self.sidecar: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return self.config.env(self.socket_path, self.http_port)

    def _spawn(self, script: str, log_name: str) -> subprocess.Popen[bytes]:
        with open(self.run_dir / log_name, "ab") as log:
            return subprocess.Popen(
                [venv_bin(script)], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def start_host(self) -> None:
        self.host = self._spawn("kre-handler-host", "handler-host.log")

    def start_sidecar(self) -> None:
        self.sidecar = self._spawn("kre-sidecar", "sidecar.log")

    def start(self, timeout: float = 30.0) -> LocalNode:
        self.start_host()
        self.start_sidecar()
        self.wait_ready(timeout)
        return self

    def http_status(self, path: str) -> int:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as err:
            return int(err.code)
        except OSError:
            return 0

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the sidecar's /readyz says NATS is connected and the host is SERVING."""

        def ready() -> bool:
            for proc, name in ((self.host, "handler host"), (self.sidecar, "sidecar")):
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs()}")
            return self.http_status("/readyz") == 200

        try:
            wait_until(ready, timeout, "sidecar /readyz")
        except TimeoutError as err:
            raise TimeoutError(f"{err}\n{self.logs()}") from None

    def logs(self, tail: int = 40) -> str:
        parts = []
        for name in ("handler-host.log", "sidecar.log"):
            path = self.run_dir / name
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {name} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)

    def send_signal(self, which: str, sig: int) -> None:
        proc = self.host if which == "host" else self.sidecar
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, sig)

    def stop_sidecar(self, timeout: float = 30.0, sig: int = signal.SIGTERM) -> int | None:
        code = stop_process(self.sidecar, timeout, sig)
        self.sidecar = None
        return code

    def stop_host(self, timeout: float = 30.0, sig: int = signal.SIGTERM) -> int | None:
        code = stop_process(self.host, timeout, sig)
        self.host = None
        return code

    def stop(self) -> None:
        """The order Kubernetes would give a pod being deleted: sidecar first, then host."""
        self.stop_sidecar()
        self.stop_host()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> LocalNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
