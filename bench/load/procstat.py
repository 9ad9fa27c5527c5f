"""CPU time of processes and of the machine, read from /proc (Linux only).

A benchmark point snapshots every process of the mode under test, and the load generator,
before and after its measured window; the difference is the CPU each spent on that window.
`/proc/<pid>/stat` sums every thread of the process (gRPC's C-core threads and the inference
pool included), which is what "CPU per request" must count.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

#: Kernel clock ticks per second: the unit of utime/stime in /proc.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")
# Fields of /proc/<pid>/stat after the ")" that closes the command name (which may hold spaces):
# index 0 is field 3 (state), so utime (field 14) is 11 and stime (field 15) is 12.
_UTIME, _STIME = 11, 12


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0.0 once it is gone."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[_UTIME]) + int(fields[_STIME])) / CLOCK_TICKS


def thread_cpu_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """thread id -> (thread name from `comm`, utime + stime seconds) for every thread of `pid`."""
    out: dict[int, tuple[str, float]] = {}
    try:
        tids = [int(t.name) for t in (_PROC / str(pid) / "task").iterdir()]
    except (FileNotFoundError, ProcessLookupError):
        return out
    for tid in tids:
        task = _PROC / str(pid) / "task" / str(tid)
        try:
            text, name = (task / "stat").read_text(), (task / "comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
        fields = text[text.rindex(")") + 2 :].split()
        out[tid] = (name, (int(fields[_UTIME]) + int(fields[_STIME])) / CLOCK_TICKS)
    return out


def thread_groups(
    pid: int, before: Mapping[int, tuple[str, float]], after: Mapping[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds spent between two `thread_cpu_seconds` snapshots, by thread name.

    The process's first thread (tid == pid) runs the asyncio event loop in every node; it is
    reported on its own, the others by their `comm` name (e.g. grpc's `event_engine`).
    """
    groups: dict[str, float] = {}
    for tid, (name, seconds) in after.items():
        label = "main thread (asyncio event loop)" if tid == pid else f"'{name}' threads"
        spent = max(0.0, seconds - before.get(tid, (name, 0.0))[1])
        groups[label] = groups.get(label, 0.0) + spent
    return dict(sorted(groups.items(), key=lambda item: -item[1]))


@dataclass(frozen=True)
class MachineTimes:
    """Machine-wide CPU seconds since boot: busy (everything but idle and iowait) and total."""

    busy: float
    total: float


def machine_times() -> MachineTimes:
    """The first line of /proc/stat (all CPUs together)."""
    first = (_PROC / "stat").read_text().splitlines()[0].split()
    ticks = [int(v) for v in first[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    # guest time is already counted in user; don't count it twice.
    total = sum(ticks[:8])
    return MachineTimes(busy=(total - idle) / CLOCK_TICKS, total=total / CLOCK_TICKS)


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds of named processes and of the whole machine at one moment."""

    processes: Mapping[str, float]
    machine: MachineTimes


def snapshot(pids: Mapping[str, int]) -> CpuSnapshot:
    """CPU seconds of each named pid, and of the machine, now."""
    return CpuSnapshot({name: process_cpu_seconds(pid) for name, pid in pids.items()}, machine_times())


@dataclass(frozen=True)
class CpuUsage:
    """CPU spent between two snapshots: per process, and the machine's busy fraction (0..1).

    `machine_busy_s` and `machine_total_s` are CPU seconds over all cores: what anything on the
    machine used, and what it could have used.
    """

    seconds: Mapping[str, float]
    machine_busy: float
    machine_busy_s: float = 0.0
    machine_total_s: float = 0.0

    def total(self, names: Iterable[str]) -> float:
        """Sum of the named processes' CPU seconds (names that were not measured count 0)."""
        return sum(self.seconds.get(name, 0.0) for name in names)


def usage(before: CpuSnapshot, after: CpuSnapshot) -> CpuUsage:
    """What each process, and the machine, spent from `before` to `after`."""
    seconds = {
        name: max(0.0, after.processes.get(name, 0.0) - start) for name, start in before.processes.items()
    }
    span = after.machine.total - before.machine.total
    busy_s = after.machine.busy - before.machine.busy
    # /proc/stat's counters tick per core and are read a moment apart: over a short span the busy
    # share can come out a hair outside 0..1, which is no information; clamp it.
    busy = min(1.0, max(0.0, busy_s / span)) if span > 0 else 0.0
    return CpuUsage(seconds, busy, busy_s, span)
