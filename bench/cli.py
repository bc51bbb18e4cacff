"""`python -m bench`: run the cases, print one table, the ratios and the targets.

Exit status: 0 when every input got exactly one good reply (whether or not a speed
target was met: this is a measurement), 1 when anything was lost, duplicated or came
back as an error, 2 when the run itself failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Coroutine
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from bench import report
from bench.cases import FULL, QUICK, Case
from bench.runner import Options, machine, run, run_profile

T = TypeVar("T")

DEFINITIONS = """\
in B: one input as published, the whole KRE envelope (gzipped in (d)).
msgs/s: backlog cases (a, c, d) publish all N inputs first, then start the node (or the
  baseline loop): N / (last output's stored time - first fetch possible: from the sidecar's
  log, host SERVING and consumer bound; the baseline loop's bind).
  (b): replies / time, one request at a time.
p50/p99: end to end, JetStream publish of the input to its output at a core subscriber,
  one at a time ((c) and (d): a one-at-a-time pass on the same node after the backlog).
RSS: VmHWM, the process's peak; CPU: % of one core over the measured window; other CPU:
  every other process on the machine then (not this benchmark): should be near 0.
  Baseline rows show the bare loop's process in the sidecar column.
Each row: the run with the median msgs/s of --repeat runs; lost/dup/err: all runs added,
  from the output subject read back from the stream; must all be 0."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller N everywhere")
    p.add_argument("--cases", default="abcd", help="which cases, e.g. 'ab' (default abcd)")
    p.add_argument("--n", type=int, help="N of (a), 100 B all at once")
    p.add_argument("--latency-n", type=int, help="N of (b), one at a time")
    p.add_argument("--n-100k", type=int, help="N of (c), 100 KB")
    p.add_argument("--n-2m", type=int, help="N of (d), 2 MB")
    p.add_argument("--probe-n", type=int, help="one-at-a-time pass after (c) and (d)")
    p.add_argument("--repeat", type=int, help="runs per case, median shown (default 3; quick 1)")
    p.add_argument("--no-baseline", action="store_true", help="skip the bare nats-py loop")
    p.add_argument("--sync-handler", action="store_true", help="the echo handler as a def")
    p.add_argument("--env", action="append", default=[], metavar="KRT_X=V",
                   help="extra variable for both processes (repeatable)")  # fmt: skip
    p.add_argument("--logs", type=Path, help="keep the nodes' logs in this folder")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="instead: py-spy on both processes under (a) (or the first of"
                        " --cases c, d), files in DIR")  # fmt: skip
    p.add_argument("--native", action="store_true", help="with --profile: C frames too")
    return p.parse_args(argv)


def build_cases(args: argparse.Namespace) -> list[Case]:
    counts = {"a": args.n, "b": args.latency_n, "c": args.n_100k, "d": args.n_2m}
    chosen = []
    for case in QUICK if args.quick else FULL:
        if case.key in args.cases:
            probe = args.probe_n if case.latency_count else None
            chosen.append(case.scaled(counts[case.key], probe))
    if not chosen:
        raise SystemExit(f"--cases {args.cases!r}: choose among a, b, c, d")
    return chosen


def options_from(args: argparse.Namespace) -> Options:
    extra = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("KRT_"):
            raise SystemExit(f"--env wants KRT_NAME=VALUE, got {item!r}")
        extra[key] = value
    return Options(
        cases=build_cases(args),
        baseline=not args.no_baseline,
        handler="echo_sync.py" if args.sync_handler else "echo.py",
        extra_env=extra,
        logs=args.logs,
        repeat=max(1, args.repeat or (1 if args.quick else 3)),
    )


def render(rows: list[report.Row], header: list[str]) -> str:
    parts = [*header, "", report.table(rows), ""]
    ratios = report.ratios(rows)
    if ratios:
        parts.append(
            "split / baseline: " + ", ".join(f"({k}) {v:.2f}" for k, v in sorted(ratios.items()))
        )
    parts += report.references(rows)
    if ratios or report.references(rows):
        parts.append("")
    busy = report.disturbed(rows)
    if busy:
        parts += [
            "WARNING: other processes took CPU while these rows ran; run again on a quiet machine:",
            *(f"  {line}" for line in busy),
            "",
        ]
    parts += ["targets (issue 5):", report.targets_table(report.targets(rows)), "", DEFINITIONS]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    options = options_from(args)
    header = machine()
    print("\n".join(header), flush=True)
    if args.profile:
        if not set(args.cases) & {"a", "c", "d"}:
            raise SystemExit("--profile profiles a backlog case: (a), (c) or (d)")
        args.profile.mkdir(parents=True, exist_ok=True)
        print(_run_loop(run_profile(options, args.profile, args.native)))
        return
    try:
        rows = _run_loop(run(options))
    except Exception as exc:
        print(f"\nbenchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(2)
    print()
    print(render(rows, []))
    if args.json:
        args.json.write_text(json.dumps([_as_json(r) for r in rows], indent=2) + "\n")
    clean = all(r.tally.clean for r in rows)
    sys.exit(0 if clean else 1)


def _as_json(row: report.Row) -> dict[str, Any]:
    data = asdict(row)
    data["case"] = {"key": row.case.key, "title": row.case.title, "mode": row.case.mode.value}
    return data


def _run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """On uvloop when installed, like the sidecar: the latency probe runs on this loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)
