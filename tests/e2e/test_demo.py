"""`make demo` is the README's first command: it must work as documented."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def test_demo_prints_replies_and_exits_zero():
    done = subprocess.run(
        [sys.executable, "-m", "deploy.local.demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("Ada", "Grace", "Linus", "Margaret"):
        assert f"'Hello, {name}!'" in done.stdout
    assert "tracking: entrypoint -> greeter" in done.stdout
    assert "error in 'greeter': Request.name is empty" in done.stdout
    assert "all requests answered" in done.stdout
