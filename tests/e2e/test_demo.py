"""`make demo` is the README's first command: it must work as documented."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def test_demo_prints_replies_and_store_effects_and_exits_zero():
    done = subprocess.run(
        [sys.executable, "-m", "deploy.local.demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for name in ("Ada", "Grace", "Linus", "Margaret"):
        assert f"'Hello, {name}!'" in out
    assert out.count("tracking: entrypoint -> greeter -> recorder") == 4
    # the greeter's error envelope travels to the end of the workflow untouched
    assert "error   \"error in 'greeter': Request.name is empty" in out
    assert "MongoDB: 4 documents in 'greetings', 4 in 'classificationMetrics'" in out
    assert "InfluxDB: 4 points of measurement 'greetings' (language=en,version=v1)" in out
    assert "all requests answered" in out


def test_demo_serve_keeps_serving_until_interrupted():
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.local.demo", "--serve"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("serving:"):
                break
        assert any(line.startswith("serving:") for line in lines), "".join(lines)
        time.sleep(0.5)  # still serving after the replies: it did not exit on its own
        assert proc.poll() is None, "".join(lines)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines) + rest
    assert "all requests answered" in rest
