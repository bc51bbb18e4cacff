"""The sidecar as a process: what it prints and how it exits when it cannot start."""

from __future__ import annotations

import socket
import subprocess

import pytest

from deploy.local.procs import venv_bin

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def test_a_busy_http_port_is_one_line_and_exit_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            "KRT_NODE_NAME": "n",
            "KRT_NATS_SERVER": "nats://127.0.0.1:1",  # never reached: HTTP comes first
            "KRT_NATS_INPUT": "s.in",
            "KRT_NATS_OUTPUT": "s.out",
            "KRT_NATS_STREAM": "s",
            "KRT_HTTP_HOST": "127.0.0.1",
            "KRT_HTTP_PORT": str(port),
            "PATH": "/usr/bin:/bin",
        }
        done = subprocess.run(
            [venv_bin("kre-sidecar")], env=env, capture_output=True, text=True, timeout=30
        )

    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "KRT_HTTP_PORT" in errors[0], output
