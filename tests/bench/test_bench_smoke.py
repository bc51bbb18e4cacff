"""`python -m bench --quick` with tiny N: the harness runs end to end and nothing is lost.

It asserts nothing about speed: timings belong to the benchmark, never to the tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--n", "40", "--latency-n", "10", "--n-100k", "10", "--n-2m", "2", "--probe-n", "2"]

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_quick_bench_prints_the_table_and_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", *TINY, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 0, printed
    for text in (
        "msgs/s",
        "p50 ms",
        "sidecar RSS CPU",
        "split / baseline:",
        "targets (issue 5):",
        "awaiting each PubAck",
    ):
        assert text in printed, printed
    rows = json.loads(out.read_text())
    assert {(r["case"]["key"], r["impl"]) for r in rows} == {
        ("a", "baseline"),
        ("a", "each-ack"),
        ("a", "split"),
        ("b", "split"),
        ("c", "baseline"),
        ("c", "split"),
        ("d", "split"),
    }
    for row in rows:
        assert row["tally"] == {"lost": 0, "duplicated": 0, "errors": 0}, row
        # Every row timed, however small N: a backlog done within the first poll of
        # /readyz once left (a) without a rate.
        assert row["rate"] is not None and row["rate"] > 0, row
