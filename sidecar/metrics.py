"""The sidecar's Prometheus metrics and their text exposition, without a client library.

The message path counts in plain numbers on the event loop's thread (`Count`,
`Timing`); `exposition()` writes them in Prometheus' text format when /metrics is
scraped, on that same thread, with the usual `process_*` and `python_*` families.
prometheus_client took a lock on every update (the eight updates per message cost about
5 us of the sidecar's ~130 us per message, these about 1) and 1.6 MB of the sidecar's
memory to import. Nothing here may be updated from another thread.
"""

from __future__ import annotations

import gc
import os
import platform
import resource
from bisect import bisect_left
from collections.abc import Iterator

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BACKSLASH, NEWLINE = "\\", "\n"


class Count:
    """A counter's (or a gauge's) value."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount


class Timing:
    """A histogram of seconds: a count per bucket (not cumulative) and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: over every bound (+Inf)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1  # buckets are `le`
        self.total += seconds


class _Labelled:
    """A counter with one label: a Count per label value, made on first use."""

    def __init__(self, name: str, doc: str, label: str) -> None:
        self.name, self.doc, self.label = name, doc, label
        self.children: dict[str, Count] = {}

    def labels(self, value: str) -> Count:
        child = self.children.get(value)
        if child is None:
            child = self.children[value] = Count()
        return child

    def lines(self) -> Iterator[str]:
        yield from _head(f"{self.name}_total", self.doc, "counter")
        for value, child in sorted(self.children.items()):
            yield f'{self.name}_total{{{self.label}="{_escape(value)}"}} {_number(child.value)}'


MESSAGES = _Labelled(
    "kre_sidecar_messages",
    "Input messages settled, by outcome (published, acked, skipped_replied, "
    "error_published, retried, dead_lettered, abandoned).",
    "outcome",
)
IN_FLIGHT = Count()
HANDLER_SECONDS = Timing(
    (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
)
PUBLISHED = _Labelled(
    "kre_sidecar_published",
    "Envelopes published to JetStream, by kind (output, error, early_reply).",
    "kind",
)
PUBLISH_SECONDS = Timing((0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5))
REDELIVERIES = Count()
BYTES = _Labelled(
    "kre_sidecar_bytes",
    "Message bytes as they travel on NATS: in (fetched inputs), out (published).",
    "direction",
)
COMPRESSIONS = _Labelled(
    "kre_sidecar_compressions",
    "Gzipped envelopes: decompressed (inputs) and compressed (outputs over the limit).",
    "direction",
)

BYTES_IN = BYTES.labels("in")
BYTES_OUT = BYTES.labels("out")
DECOMPRESSED = COMPRESSIONS.labels("decompressed")
COMPRESSED = COMPRESSIONS.labels("compressed")


def published(kind: str) -> Count:
    """The PUBLISHED count for `kind`."""
    return PUBLISHED.labels(kind)


def settled(outcome: str) -> Count:
    """The MESSAGES count for `outcome`."""
    return MESSAGES.labels(outcome)


def exposition() -> bytes:
    """Every metric of this process, in Prometheus' text format (version 0.0.4)."""
    return ("\n".join(_lines()) + "\n").encode()


def _lines() -> Iterator[str]:
    yield from MESSAGES.lines()
    yield from _single(
        "kre_sidecar_in_flight",
        "Input messages being processed right now.",
        "gauge",
        IN_FLIGHT.value,
    )
    yield from _histogram(
        "kre_sidecar_handler_seconds",
        "Time from handing a message to the handler host to getting its result.",
        HANDLER_SECONDS,
    )
    yield from PUBLISHED.lines()
    yield from _histogram(
        "kre_sidecar_publish_seconds",
        "Time from a JetStream publish to its PubAck.",
        PUBLISH_SECONDS,
    )
    yield from _single(
        "kre_sidecar_redeliveries_total",
        "Input messages fetched again (delivery attempt > 1).",
        "counter",
        REDELIVERIES.value,
    )
    yield from BYTES.lines()
    yield from COMPRESSIONS.lines()
    yield from _process()
    yield from _python()


def _histogram(name: str, doc: str, timing: Timing) -> Iterator[str]:
    yield from _head(name, doc, "histogram")
    seen = 0
    for bound, count in zip((*timing.bounds, float("inf")), timing.counts, strict=True):
        seen += count
        yield f'{name}_bucket{{le="{_number(bound)}"}} {_number(seen)}'
    yield f"{name}_count {_number(seen)}"
    yield f"{name}_sum {_number(timing.total)}"


def _single(name: str, doc: str, kind: str, value: float) -> Iterator[str]:
    yield from _head(name, doc, kind)
    yield f"{name} {_number(value)}"


def _head(name: str, doc: str, kind: str) -> Iterator[str]:
    yield f"# HELP {name} {doc.replace(BACKSLASH, BACKSLASH * 2).replace(NEWLINE, BACKSLASH + 'n')}"
    yield f"# TYPE {name} {kind}"


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = resource.getpagesize()


def _process() -> Iterator[str]:
    """The families prometheus_client's process collector writes, read from /proc (Linux)."""
    try:
        with open("/proc/self/stat", "rb") as stat_file:
            # Fields after the command name, which is in parentheses and may hold spaces.
            fields = stat_file.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as boot_file:
            boot = next(float(line.split()[1]) for line in boot_file if line.startswith(b"btime"))
        open_fds = len(os.listdir("/proc/self/fd"))
    except (OSError, StopIteration, IndexError):
        return  # not Linux: no process families, as with prometheus_client
    soft_fds = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    for name, doc, kind, value in (
        (
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            "gauge",
            float(fields[20]),
        ),
        (
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            "gauge",
            float(fields[21]) * _PAGE,
        ),
        (
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            "gauge",
            float(fields[19]) / _TICKS + boot,
        ),
        (
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
            "counter",
            (float(fields[11]) + float(fields[12])) / _TICKS,
        ),
        ("process_open_fds", "Number of open file descriptors.", "gauge", float(open_fds)),
        ("process_max_fds", "Maximum number of open file descriptors.", "gauge", float(soft_fds)),
    ):
        yield from _single(name, doc, kind, value)


def _python() -> Iterator[str]:
    """python_gc_* by generation and python_info, as prometheus_client writes them."""
    stats = gc.get_stats()
    for name, key, doc in (
        ("python_gc_objects_collected", "collected", "Objects collected during gc"),
        (
            "python_gc_objects_uncollectable",
            "uncollectable",
            "Uncollectable objects found during GC",
        ),
        ("python_gc_collections", "collections", "Number of times this generation was collected"),
    ):
        yield from _head(f"{name}_total", doc, "counter")
        for generation, stat in enumerate(stats):
            yield f'{name}_total{{generation="{generation}"}} {_number(stat[key])}'
    major, minor, patch = platform.python_version_tuple()
    yield from _head("python_info", "Python platform information", "gauge")
    yield (
        f'python_info{{implementation="{platform.python_implementation()}",major="{major}",'
        f'minor="{minor}",patchlevel="{patch}",version="{platform.python_version()}"}} 1.0'
    )


def _number(value: float) -> str:
    """A sample value as Prometheus (and Go) write it: 1.0, 0.005, +Inf."""
    value = float(value)
    if value == float("inf"):
        return "+Inf"
    if value == float("-inf"):
        return "-Inf"
    return repr(value)  # "nan" for NaN: Prometheus reads it (case-insensitive)


def _escape(label_value: str) -> str:
    return label_value.replace(BACKSLASH, BACKSLASH * 2).replace(NEWLINE, "\\n").replace('"', '\\"')
