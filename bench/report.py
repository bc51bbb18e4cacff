"""The printed result: one table, the split/baseline ratios, and the targets of issue 5."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bench.cases import Case
from bench.procstat import Usage
from bench.stream import Tally

ORIGINAL_RUNNER_100KB = 409.0  # msgs/s, the KRE Python runner on this kind of machine
BIG_CASES = ("c", "d")  # 100 KB and 2 MB messages: the sidecar holds them


@dataclass
class Row:
    case: Case
    impl: str  # "split", "baseline" or "each-ack" (the loop awaiting each PubAck)
    count: int
    wire_bytes: int
    tally: Tally
    rate: float | None = None  # msgs/s
    latencies: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    usage: dict[str, Usage | None] = field(default_factory=dict)  # sidecar, host, nats, loop
    runs: int = 1  # the row is the median-rate run of this many


@dataclass(frozen=True)
class Target:
    name: str
    measured: str
    wanted: str
    passed: bool | None  # None: not measured in this run


def _num(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _proc(usage: Usage | None) -> str:
    if usage is None:
        return "-"
    return f"{_num(usage.hwm_mb)} MB {_num(usage.cpu_pct)}%"


COLUMNS: list[tuple[str, str, Callable[[Row], str]]] = [
    ("case", "<", lambda r: r.case.label),
    ("impl", "<", lambda r: r.impl),
    ("N", ">", lambda r: str(r.count)),
    ("in B", ">", lambda r: str(r.wire_bytes)),
    ("msgs/s", ">", lambda r: _num(r.rate)),
    ("p50 ms", ">", lambda r: _num(r.p50_ms, "{:.2f}")),
    ("p99 ms", ">", lambda r: _num(r.p99_ms, "{:.2f}")),
    ("sidecar RSS CPU", ">", lambda r: _proc(r.usage.get("sidecar") or r.usage.get("loop"))),
    ("host RSS CPU", ">", lambda r: _proc(r.usage.get("host"))),
    ("nats CPU", ">", lambda r: _num(_cpu(r.usage.get("nats")), "{:.0f}%")),
    ("other CPU", ">", lambda r: _num(_cpu(r.usage.get("other")), "{:.0f}%")),
    ("lost", ">", lambda r: str(r.tally.lost)),
    ("dup", ">", lambda r: str(r.tally.duplicated)),
    ("err", ">", lambda r: str(r.tally.errors)),
]


def _cpu(usage: Usage | None) -> float | None:
    return None if usage is None else usage.cpu_pct


def table(rows: list[Row]) -> str:
    cells = [[fmt(row) for _, _, fmt in COLUMNS] for row in rows]
    heads = [name for name, _, _ in COLUMNS]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    aligns = [align for _, align, _ in COLUMNS]

    def line(values: list[str]) -> str:
        return "  ".join(f"{v:{a}{w}}" for v, a, w in zip(values, aligns, widths, strict=True))

    out = [line(heads), "  ".join("-" * w for w in widths)]
    out += [line(c) for c in cells]
    return "\n".join(out)


BUSY_MACHINE = 15.0  # % of one core used by processes outside the benchmark


def disturbed(rows: list[Row]) -> list[str]:
    """Rows measured while something else on the machine took CPU."""
    return [
        f"{r.case.label} {r.impl}: {other:.0f}%"
        for r in rows
        if (other := _cpu(r.usage.get("other"))) is not None and other > BUSY_MACHINE
    ]


def ratios(rows: list[Row]) -> dict[str, float]:
    """split msgs/s over baseline msgs/s, per case that has both."""
    found: dict[str, float] = {}
    for row in rows:
        if row.impl != "split" or row.rate is None:
            continue
        base = next((b for b in rows if b.impl == "baseline" and b.case.key == row.case.key), None)
        if base is not None and base.rate:
            found[row.case.key] = row.rate / base.rate
    return found


ORIGINAL_RUNNER_100B = 750.0  # msgs/s, (a) for the KRE Python runner, as issue 5 quotes it


def references(rows: list[Row]) -> list[str]:
    """(a) against the slower loop and the original runner: context, not targets."""
    split = next((r for r in rows if r.impl == "split" and r.case.key == "a"), None)
    if split is None or not split.rate:
        return []
    lines = [
        f"(a) split / original KRE runner (750 msgs/s): {split.rate / ORIGINAL_RUNNER_100B:.1f}x"
    ]
    each = next((r for r in rows if r.impl == "each-ack" and r.case.key == "a"), None)
    if each is not None and each.rate:
        lines.append(
            f"(a) split / bare loop awaiting each PubAck (issue 5's ~3,500 msgs/s loop): "
            f"{split.rate / each.rate:.2f}"
        )
    return lines + _big_message_memory(rows)


def _big_message_memory(rows: list[Row]) -> list[str]:
    """The sidecar's peak with (c)'s and (d)'s messages held, beside the bare loop's."""
    lines = []
    for key in BIG_CASES:
        split = next((r for r in rows if r.impl == "split" and r.case.key == key), None)
        if split is None or not (usage := split.usage.get("sidecar")) or not usage.hwm_mb:
            continue
        line = f"({key}) sidecar peak RSS, holding its messages: {usage.hwm_mb:.0f} MB"
        base = next((r for r in rows if r.impl == "baseline" and r.case.key == key), None)
        if base is not None and (loop := base.usage.get("loop")) and loop.hwm_mb:
            line += f" (the bare loop: {loop.hwm_mb:.0f} MB)"
        lines.append(line)
    return lines


def targets(rows: list[Row]) -> list[Target]:
    split = {r.case.key: r for r in rows if r.impl == "split"}
    small = {key: row for key, row in split.items() if key not in BIG_CASES}
    ratio = ratios(rows)
    found = [
        _at_least("(a) split / bare-loop baseline", ratio.get("a"), 0.60, "{:.2f}"),
        _at_most("(b) p50 end to end", _get(split, "b", "p50_ms"), 1.5, "{:.2f} ms"),
        _at_most("(b) p99 end to end", _get(split, "b", "p99_ms"), 4.0, "{:.2f} ms"),
        _at_least(
            "(c) 100 KB: 2x the original runner",
            _get(split, "c", "rate"),
            2 * ORIGINAL_RUNNER_100KB,
            "{:.0f} msgs/s",
        ),
        # The sidecar's own footprint: with 100 KB and 2 MB messages it also holds up to
        # KRT_MAX_IN_FLIGHT_BYTES of them, several times over (listed above the targets).
        _at_most(*_peak(small, "sidecar", "100 B cases"), 64, "{:.1f} MB"),
        _at_most(*_peak(split, "host"), 80, "{:.1f} MB"),
    ]
    lost = sum(r.tally.lost for r in rows)
    dup = sum(r.tally.duplicated for r in rows)
    err = sum(r.tally.errors for r in rows)
    clean = lost + dup + err == 0
    found.append(Target("lost / dup / err, all rows", f"{lost} / {dup} / {err}", "0", clean))
    return found


def _get(rows: dict[str, Row], key: str, attr: str) -> float | None:
    row = rows.get(key)
    return None if row is None else getattr(row, attr)


PROCESS_NAMES = {"sidecar": "sidecar", "host": "handler host"}


def _peak(rows: dict[str, Row], proc: str, which: str = "") -> tuple[str, float | None]:
    """(the target's name, saying which case peaked; the highest VmHWM of these cases)."""
    name = f"{PROCESS_NAMES[proc]} peak RSS" + (f", {which}" if which else "")
    peaks = [(u.hwm_mb, key) for key, r in rows.items() if (u := r.usage.get(proc)) and u.hwm_mb]
    if not peaks:
        return name, None
    value, key = max(peaks)
    return f"{name} (highest: ({key}))", value


def _at_least(name: str, value: float | None, floor: float, fmt: str) -> Target:
    wanted = ">= " + fmt.format(floor)
    if value is None:
        return Target(name, "not measured", wanted, None)
    return Target(name, fmt.format(value), wanted, value >= floor)


def _at_most(name: str, value: float | None, ceiling: float, fmt: str) -> Target:
    wanted = "<= " + fmt.format(ceiling)
    if value is None:
        return Target(name, "not measured", wanted, None)
    return Target(name, fmt.format(value), wanted, value <= ceiling)


def targets_table(found: list[Target]) -> str:
    width = max(len(t.name) for t in found)
    measured = max(len(t.measured) for t in found)
    wanted = max(len(t.wanted) for t in found)
    lines = []
    for t in found:
        verdict = {True: "PASS", False: "FAIL", None: "-"}[t.passed]
        lines.append(
            f"{t.name:<{width}}  {t.measured:>{measured}}  {t.wanted:>{wanted}}  {verdict}"
        )
    return "\n".join(lines)
