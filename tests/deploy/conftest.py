"""Shared facts for the deploy checks: the repository, the README's env table, the tools."""

from __future__ import annotations

import re
import shutil
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL_HINT = "install the checkers with: .venv/bin/pip install -e '.[deploy-check]'"

# Variables that hold a credential, and the one container that reads each: they come
# from a Secret (Kubernetes) or an env file (compose) given to that container only,
# never from the ConfigMap or the env file both containers share.
SECRET_VARIABLES = {
    **{name: "sidecar" for name in ("KRT_NATS_USER", "KRT_NATS_PASSWORD", "KRT_NATS_TOKEN")},
    "KRT_INFLUX_TOKEN": "handler-host",
}


def tool(name: str) -> str:
    """A checker binary: beside this Python (the venv's bin, not always on PATH) or on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found; {INSTALL_HINT}")
    return found


def readme_env_vars(readme: Path = ROOT / "README.md") -> list[str]:
    """Every KRT_* name in backticks in the first column of the README's env table."""
    text = readme.read_text()
    section = text.split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    names: list[str] = []
    for line in section.splitlines():
        if line.startswith("|"):
            names += re.findall(r"`(KRT_[A-Z0-9_]+)`", line.split("|")[1])
    return names


@pytest.fixture(scope="session")
def env_table() -> list[str]:
    names = readme_env_vars()
    assert len(names) >= 13, f"the README's env table did not parse: {names}"
    return names


@pytest.fixture(scope="session")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())
