"""`python -m bench --profile DIR`: py-spy on the sidecar and the handler host under load.

Case (a) by default; `--cases c` or `--cases d` profiles that case instead.

The node is started and ready first, then py-spy attaches to both processes, then the N
inputs are published at once (pipelined) and drained; py-spy stops when the node has acked the
last one. So the samples hold the message path only, no imports or start-up. py-spy
takes CPU from the same 2 cores: the rate printed here is not a result.

Each process gets a collapsed-stack file (`sidecar.txt`, `host.txt`, py-spy's `raw`
format: any flame-graph tool reads it) and a summary of the hottest functions, by
self time and by inclusive time, printed and written beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from bench.cases import Case, Workload
from bench.procstat import Sampler
from bench.run_split import NODE, NodeWatch, Setup, drain_timeout
from bench.stream import (
    delete_stream,
    drain_rate,
    fresh_stream,
    publish_all,
    read_outputs,
    wait_consumed,
)
from bench.stream import tally as tally_outputs
from deploy.local.node import LocalNode
from deploy.local.procs import venv_bin

RATE = 250  # samples per second
_NOT_FRAMES = ("process ", "thread ")  # py-spy's own labels at the root of each stack
TOP = 25


def py_spy() -> str:
    try:
        return venv_bin("py-spy")
    except FileNotFoundError:
        found = shutil.which("py-spy")
        if found is None:
            raise FileNotFoundError(
                "py-spy is not installed: .venv/bin/pip install py-spy"
            ) from None
        return found


@contextlib.contextmanager
def recording(pids: dict[str, int], out: Path, native: bool = False) -> Iterator[None]:
    """py-spy record on each PID while the block runs; SIGINT makes it write its file."""
    binary = py_spy()
    procs = []
    for name, pid in pids.items():
        cmd = [binary, "record", "--pid", str(pid), "--rate", str(RATE)]
        cmd += ["--format", "raw", "--output", str(out / f"{name}.txt")]
        # Native unwinding must pause the process; Python frames alone need not.
        cmd.append("--native" if native else "--nonblocking")
        log = open(out / f"{name}.py-spy.log", "wb")  # closed below
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        yield
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc, log in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


async def profile_case(setup: Setup, case: Case, out: Path, native: bool = False) -> str:
    """Run `case` (a backlog case) under py-spy, files in `out` (it must exist)."""
    stream = f"bench-prof-{uuid.uuid4().hex[:8]}"
    config = setup.node_config(stream)
    await fresh_stream(setup.js, stream, config.subjects)
    work = Workload(case.payload_bytes, case.count)
    node = LocalNode(config, setup.run_dir("profile"))
    try:
        node.start()
        assert node.sidecar is not None and node.host is not None
        pids = {"sidecar": node.sidecar.pid, "host": node.host.pid}
        with Sampler(pids), recording(pids, out, native):
            await asyncio.sleep(1.0)  # py-spy attached
            started = time.time()
            last_seq = await publish_all(setup.js, config.input_subject, work.messages())
            timeout = drain_timeout(case.count, case.payload_bytes)
            await wait_consumed(setup.js, stream, NODE, last_seq, timeout, NodeWatch(node))
        outputs = await read_outputs(setup.js, stream, config.output_subject, work.wire_bytes())
    except Exception:
        print(node.logs(60), file=sys.stderr)
        raise
    finally:
        node.close()
        await delete_stream(setup.js, stream)
    counts = tally_outputs(work.expected, outputs)
    rate, _ = drain_rate(outputs, started)
    lines = [
        f"profiled {case.label}, N={case.count}: {rate or 0:.0f} msgs/s under py-spy "
        f"(not a result), lost {counts.lost}, dup {counts.duplicated}, err {counts.errors}",
    ]
    for name in pids:
        path = out / f"{name}.txt"
        text = summarize(path.read_text()) if path.exists() else "(py-spy wrote nothing)"
        (out / f"{name}-summary.txt").write_text(text + "\n")
        lines += ["", f"== {name} ({path})", text]
    return "\n".join(lines)


def _frame(raw: str) -> str:
    """`handle (sidecar/message.py:72)` -> `handle (sidecar/message.py)`: lines merged."""
    name, _, where = raw.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def summarize(collapsed: str, top: int = TOP) -> str:
    """The hottest functions of a py-spy `raw` profile, by self and by inclusive samples."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";") if f and not f.startswith(_NOT_FRAMES)]
        if frames:
            self_time[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return "(no samples)"

    def block(title: str, counter: Counter[str]) -> list[str]:
        rows = [f"{title} ({total} samples)"]
        rows += [f"{100 * n / total:6.1f}%  {frame}" for frame, n in counter.most_common(top)]
        return rows

    return "\n".join([*block("self", self_time), "", *block("inclusive", inclusive)])
