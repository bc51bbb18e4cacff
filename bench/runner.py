"""One benchmark run: a nats-server, then each case, split runner and baseline, in turn."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.internal import api_implementation

from bench.cases import Case, Mode
from bench.report import Row
from bench.run_baseline import EACH_ACK, run_baseline
from bench.run_split import Setup, run_split
from bench.stream import Tally
from deploy.local.client import connect
from deploy.local.nats import NatsServer
from deploy.local.procs import venv_bin


@dataclass
class Options:
    cases: list[Case]
    baseline: bool = True
    handler: str = "echo.py"
    extra_env: dict[str, str] = field(default_factory=dict)
    logs: Path | None = None
    repeat: int = 1


async def run(options: Options, report: bool = True) -> list[Row]:
    """Every case in order, `repeat` times, the baseline and the split runner taking turns.

    Each row is the run with the median rate; its lost/dup/err are those of all runs.
    """
    rows: list[Row] = []
    with NatsServer() as server:
        nc, js = await connect(server.url)
        setup = Setup(server, nc, js, options.handler, options.extra_env, options.logs)
        try:
            for case in options.cases:
                rows += await _case_rows(setup, case, options, report)
        finally:
            await nc.close()
    return rows


async def _case_rows(setup: Setup, case: Case, options: Options, report: bool) -> list[Row]:
    base: list[Row] = []
    each: list[Row] = []
    split: list[Row] = []
    for _ in range(options.repeat):
        if case.baseline and options.baseline:
            base.append(await _step(run_baseline(setup, case), case, "baseline", report))
        if case.each_ack_baseline and options.baseline:
            run = run_baseline(setup, case, each_ack=True)
            each.append(await _step(run, case, EACH_ACK, report))
        split.append(await _step(run_split(setup, case), case, "split", report))
    return [median_row(found) for found in (base, each, split) if found]


def median_row(runs: list[Row]) -> Row:
    ordered = sorted(runs, key=lambda r: r.rate or 0.0)
    row = ordered[(len(ordered) - 1) // 2]
    row.runs = len(runs)
    row.tally = Tally(
        lost=sum(r.tally.lost for r in runs),
        duplicated=sum(r.tally.duplicated for r in runs),
        errors=sum(r.tally.errors for r in runs),
    )
    return row


async def run_profile(options: Options, out: Path, native: bool = False) -> str:
    """The first backlog case chosen ((a) by default) under py-spy (see bench.profile)."""
    from bench.profile import profile_case

    case = next(c for c in options.cases if c.mode is Mode.BACKLOG)
    with NatsServer() as server:
        nc, js = await connect(server.url)
        setup = Setup(server, nc, js, options.handler, options.extra_env, options.logs)
        try:
            return await profile_case(setup, case, out, native)
        finally:
            await nc.close()


async def _step(coro: Awaitable[Row], case: Case, impl: str, report: bool) -> Row:
    if report:
        print(f"  {case.label}: {impl}, N={case.count} ...", end="", flush=True)
    row = await coro
    if report:
        rate = "-" if row.rate is None else f"{row.rate:.0f} msgs/s"
        print(f" {rate}", flush=True)
    return row


def machine() -> list[str]:
    """What ran it: the lines printed above the table."""
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        loop = "uvloop " + __import__("uvloop").__version__
    except ImportError:
        loop = "asyncio (uvloop not installed)"
    return [
        f"machine: {cpu}, {os.cpu_count()} cores, {_mem_gib():.0f} GiB, "
        f"{platform.system()} {platform.release()}",
        f"python {platform.python_version()}, protobuf backend {api_implementation.Type()}, "
        f"event loop {loop}, {_nats_version()}",
    ]


def _mem_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _nats_version() -> str:
    try:
        binary = venv_bin("nats-server")
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "nats-server ?"
    except (OSError, subprocess.SubprocessError):
        return "nats-server " + ("?" if shutil.which("nats-server") is None else "(on PATH)")
