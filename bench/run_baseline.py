"""The baseline row: `bench.baseline` (the bare nats-py loop) as a subprocess.

Same kind of stream (a fresh one, nats-server's defaults, the node's subjects), same N,
same input bytes, the same definition of the rate as the split runner: the N inputs are
published first, then the loop is started, and the rate is N / (the last output's stored
time - the moment its consumer was bound, just before its first fetch).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

from bench.cases import Case, Workload
from bench.procstat import Sampler
from bench.report import Row
from bench.run_split import Setup, drain_timeout
from bench.stream import (
    delete_stream,
    drain_rate,
    fresh_stream,
    publish_all,
    read_outputs,
    tally,
    wait_consumed,
)
from deploy.local.procs import stop_process

DURABLE = "bare"
EACH_ACK = "each-ack"  # the impl name of the loop that awaits each PubAck


async def run_baseline(setup: Setup, case: Case, each_ack: bool = False) -> Row:
    """The bare loop; `each_ack`: the one that awaits each PubAck (impl "each-ack")."""
    stream = f"bench-{case.key}-bare-{uuid.uuid4().hex[:8]}"
    config = setup.node_config(stream)  # only for its subject names
    await fresh_stream(setup.js, stream, config.subjects)
    work = Workload(case.payload_bytes, case.count)
    proc: subprocess.Popen[bytes] | None = None
    try:
        last_seq = await publish_all(setup.js, config.input_subject, work.messages())
        timeout = drain_timeout(case.count, case.payload_bytes)
        cmd = [
            sys.executable,
            "-m",
            "bench.baseline",
            f"--url={setup.server.url}",
            f"--stream={stream}",
            f"--input={config.input_subject}",
            f"--output={config.output_subject}",
            f"--durable={DURABLE}",
            f"--count={case.count}",
            f"--timeout={timeout}",
            *(["--each-ack"] if each_ack else []),
        ]
        proc = _spawn(cmd)
        pids = {"loop": proc.pid}
        if setup.server.proc is not None:
            pids["nats"] = setup.server.proc.pid

        def check_alive() -> None:
            assert proc is not None
            if proc.poll() not in (None, 0):
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                raise RuntimeError(f"the baseline loop exited with {proc.returncode}:\n{out}")

        with Sampler(pids) as sampler:
            await wait_consumed(setup.js, stream, DURABLE, last_seq, timeout, check_alive)
        outputs = await read_outputs(setup.js, stream, config.output_subject, work.wire_bytes())
        started = _bound_at(proc)
    finally:
        stop_process(proc, timeout=10)
        await delete_stream(setup.js, stream)
    rate, end = drain_rate(outputs, started)
    return Row(
        case=case,
        impl=EACH_ACK if each_ack else "baseline",
        count=case.count,
        wire_bytes=work.wire_bytes(),
        tally=tally(work.expected, outputs),
        rate=rate,
        usage=sampler.summary(started, end),
    )


def _spawn(cmd: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _bound_at(proc: subprocess.Popen[bytes]) -> float:
    """When the loop's consumer was bound, from the line it prints as it exits."""
    out, _ = proc.communicate(timeout=30)
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("{"):
            return float(json.loads(line)["bound_at"])
    raise RuntimeError(f"the baseline loop printed no result:\n{out!r}")
