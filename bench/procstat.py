"""RSS and CPU of the processes under test, read from /proc by a sampling thread.

`/proc/<pid>/status` gives VmRSS (now) and VmHWM (the peak since the process started);
`/proc/<pid>/stat` gives utime + stime in clock ticks. CPU over a window is interpolated
between the samples on either side of it, so the window can be the one the stream's own
timestamps define.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
INTERVAL = 0.05


@dataclass(frozen=True)
class Sample:
    at: float  # time.time(), the clock nats-server stamps messages with
    rss_kb: int
    hwm_kb: int
    cpu_s: float
    anon_kb: int = 0  # RssAnon: the process's own memory, no shared library pages


@dataclass(frozen=True)
class Usage:
    """One process over one window: CPU as % of one core, RSS in MB (1 MB = 2**20 B)."""

    cpu_pct: float | None
    rss_mb: float | None  # highest VmRSS sampled in the window
    hwm_mb: float | None  # VmHWM at the last sample: the process's peak, startup included
    anon_mb: float | None = None  # highest RssAnon sampled in the window


def read(pid: int) -> Sample | None:
    """One sample, or None when the process is gone (or has exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = dict(
        line.split(":", 1)
        for line in status.splitlines()
        if line.startswith(("VmRSS", "VmHWM", "RssAnon"))
    )
    if "VmRSS" not in fields:
        return None  # a zombie: exited, not yet reaped
    # Fields after the command name, which may itself hold spaces and parentheses.
    ticks = stat.rsplit(")", 1)[1].split()
    cpu = (int(ticks[11]) + int(ticks[12])) / CLOCK_TICKS
    return Sample(
        time.time(),
        _kb(fields.get("VmRSS")),
        _kb(fields.get("VmHWM")),
        cpu,
        _kb(fields.get("RssAnon")),
    )


def read_machine() -> Sample | None:
    """All CPUs' user + nice + system time, from /proc/stat.

    Interrupt time, steal (the hypervisor's) and guest time (already in user) are left
    out: they belong to no process, so they cannot be told apart from "other".
    """
    try:
        with open("/proc/stat") as f:
            user, nice, system = (int(t) for t in f.readline().split()[1:4])
    except (OSError, ValueError):
        return None
    return Sample(time.time(), 0, 0, (user + nice + system) / CLOCK_TICKS)


def _kb(value: str | None) -> int:
    return int(value.split()[0]) if value else 0


class Sampler:
    """Samples named PIDs every INTERVAL seconds until `stop()`; `usage()` summarises."""

    MACHINE = "machine"

    def __init__(self, pids: dict[str, int | None], interval: float = INTERVAL) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid is not None}
        self.pids.setdefault("bench", os.getpid())  # this process, the sampler included
        self.samples: dict[str, list[Sample]] = {name: [] for name in self.pids}
        self.samples[self.MACHINE] = []
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self._take()  # the last word: VmHWM as late as possible

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take()
            self._stop.wait(self._interval)

    def _take(self) -> None:
        for name, pid in self.pids.items():
            sample = read(pid)
            if sample is not None:
                self.samples[name].append(sample)
        machine = read_machine()
        if machine is not None:
            self.samples[self.MACHINE].append(machine)

    def summary(self, start: float, end: float) -> dict[str, Usage | None]:
        """Each watched process over the window, and "other": the rest of the machine."""
        found = {name: self.usage(name, start, end) for name in self.pids}
        found["other"] = Usage(self.other_cpu(start, end), None, None)
        return found

    def other_cpu(self, start: float, end: float) -> float | None:
        """CPU % used in the window by processes not watched here: a busy machine."""
        machine = self.usage(self.MACHINE, start, end)
        if machine is None or machine.cpu_pct is None:
            return None
        watched = [self.usage(name, start, end) for name in self.pids]
        return max(0.0, machine.cpu_pct - sum(u.cpu_pct or 0.0 for u in watched if u))

    def usage(self, name: str, start: float, end: float) -> Usage | None:
        samples = self.samples.get(name)
        if not samples:
            return None
        inside = [s for s in samples if start <= s.at <= end] or samples
        cpu = None
        if end > start and len(samples) >= 2:
            cpu = 100 * (_cpu_at(samples, end) - _cpu_at(samples, start)) / (end - start)
        return Usage(
            cpu_pct=cpu,
            rss_mb=max(s.rss_kb for s in inside) / 1024,
            hwm_mb=samples[-1].hwm_kb / 1024,
            anon_mb=max(s.anon_kb for s in inside) / 1024,
        )


def _cpu_at(samples: list[Sample], at: float) -> float:
    """CPU seconds used by `at`, linear between the two samples around it."""
    times = [s.at for s in samples]
    i = bisect.bisect_left(times, at)
    if i == 0:
        return samples[0].cpu_s
    if i == len(samples):
        return samples[-1].cpu_s
    before, after = samples[i - 1], samples[i]
    span = after.at - before.at
    share = (at - before.at) / span if span > 0 else 1.0
    return before.cpu_s + share * (after.cpu_s - before.cpu_s)
