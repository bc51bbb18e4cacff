"""Fault injection: real nats-server, the sidecar and the handler host as subprocesses.

Each case records a `Row` in the session-wide `fault_report`; the table is printed at
the end of the session (`pytest_terminal_summary`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from deploy.local.client import ensure_stream
from deploy.local.node import NodeConfig
from tests.faults.harness import Row

HANDLERS = Path(__file__).parent / "handlers"
_ROWS: list[Row] = []


@pytest.fixture(scope="session")
def fault_report() -> list[Row]:
    """The rows of the summary table, one per fault case."""
    return _ROWS


def node_config(nats_url: str, stream: str, handler: str = "echo.py", **env: str) -> NodeConfig:
    return NodeConfig(
        nats_url=nats_url,
        stream=stream,
        base_path=HANDLERS,
        handler_path=handler,
        node_name="faulty",
        # KRT_METRICS_PORT=0: several handler hosts run at once here; none needs /metrics.
        extra={"KRT_LOG_LEVEL": "WARNING", "KRT_METRICS_PORT": "0", **env},
    )


@pytest.fixture
async def stream_for(js: object) -> AsyncIterator[Callable[[NodeConfig], object]]:
    """Create a node's stream (its subjects, the dead-letter one included); delete it after."""
    made: list[str] = []

    async def make(config: NodeConfig) -> None:
        await ensure_stream(js, config.stream, config.subjects)  # type: ignore[arg-type]
        made.append(config.stream)

    yield make
    for name in made:
        await js.delete_stream(name)  # type: ignore[attr-defined]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _ROWS:
        return
    terminalreporter.section("fault injection summary")
    for line in table(sorted(_ROWS, key=lambda row: row.case)):
        terminalreporter.write_line(line)


def table(rows: list[Row]) -> list[str]:
    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    head = ("case", "sent", "answered", "dups", "dead letters", "recovery s", "pause s", "total s")
    body = [
        (
            r.case,
            str(r.sent),
            str(r.answered),
            str(r.duplicates),
            str(r.dead_letters),
            secs(r.recovery),
            secs(r.pause),
            secs(r.elapsed),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

    def fmt(row: tuple[str, ...]) -> str:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells)

    legend = (
        "recovery: from the fault to the last reply (backlog included); pause: the longest "
        "time with no reply from the fault on; total: first publish to last reply"
    )
    return [fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body), legend]
