"""Profile a running node with py-spy during a benchmark point, and summarize where its CPU goes.

Two recordings run one after the other inside the measured window (two py-spy processes
attached at once would pause the node twice as often):

    py-spy record -o <out>/orchestrator.svg --pid PID --duration S                      flame graph
    py-spy record --native --gil --format raw -o <out>/orchestrator.txt --pid PID ...  stacks

The second one is `--native`: without it, time inside grpc's Cython/C core and in system calls
is charged to whichever Python frame called in (`Handle._run`, `Thread.run`), which hides what
the process really does. It is also `--gil`: with native stacks py-spy cannot tell a blocked
thread from a busy one (executor workers waiting on their queue would look busy), while the
thread holding the GIL is working. In every node that is mostly the asyncio event loop's thread;
how the process's CPU splits between its threads is measured apart, from /proc, over the same
recordings (`procstat.thread_groups`).

The collapsed stacks ("frame;frame;...;leaf COUNT" per line) are summarized by area (our code,
grpc, asyncio, protobuf, the interpreter, system calls) and by function: the leaf frame (where
the sample was), the innermost Python frame (whose work it was), and every Python frame on the
stack (total, leaving out the frames every busy stack passes through).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.load import procstat

#: (area, substring of a frame) in match order: the first that matches the leaf names the area.
AREAS: tuple[tuple[str, str], ...] = (
    ("ours: engine (orchestrator/graph/engine.py)", "orchestrator/graph/engine.py"),
    ("ours: compiled steps (orchestrator/graph/plan.py)", "orchestrator/graph/plan.py"),
    ("ours: graph servable (orchestrator/node.py)", "orchestrator/node.py"),
    ("ours: aggregators", "orchestrator/graph/aggregators.py"),
    ("ours: coalescing (orchestrator/stages/coalescing.py)", "orchestrator/stages/coalescing.py"),
    ("ours: other orchestrator/", "orchestrator/"),
    ("ours: OIP client (services/common/grpc/client.py)", "services/common/grpc/client.py"),
    ("ours: codec (services/common/grpc/codec.py)", "services/common/grpc/codec.py"),
    ("ours: servicer (services/common/grpc/servicer.py)", "services/common/grpc/servicer.py"),
    ("ours: data plane (services/common/dataplane.py)", "services/common/dataplane.py"),
    ("ours: stacking (services/common/batching/stacking.py)", "services/common/batching/stacking.py"),
    ("ours: other services/common", "services/common/"),
    ("metrics (prometheus_client)", "prometheus_client/"),
    ("grpc (Python, Cython and its C core)", "grpc/"),
    ("grpc (Python, Cython and its C core)", "cygrpc"),
    ("protobuf (upb)", "google/protobuf"),
    ("protobuf (upb)", "_message.abi3"),
    ("numpy", "numpy/"),
    ("asyncio event loop", "asyncio/"),
    ("asyncio event loop", "selectors.py"),
    ("asyncio event loop", "_asyncio"),
    ("threads / concurrent.futures", "concurrent/"),
    ("threads / concurrent.futures", "threading.py"),
    ("logging", "logging/"),
    ("request ids (uuid4)", "uuid.py"),
    ("CPython interpreter (eval, GC, objects)", "(object.h"),
    ("system calls: epoll_wait / poll (pollers)", "epoll_wait (libc"),
    ("system calls: epoll_wait / poll (pollers)", "poll (libc"),
    ("system calls: socket send / recv / write", "sendmsg (libc"),
    ("system calls: socket send / recv / write", "recvmsg (libc"),
    ("system calls: socket send / recv / write", "recv (libc"),
    ("system calls: socket send / recv / write", "send (libc"),
    ("system calls: socket send / recv / write", "write (libc"),
    ("system calls: socket send / recv / write", "read (libc"),
    ("libc (other: getpid, locks, malloc, ...)", "(libc"),
    ("CPython interpreter (eval, GC, objects)", "libpython"),
)
_LINE = re.compile(r" \(([^()]*):\d+\)$")
_PYTHON = re.compile(r"\.py:\d+\)$")
#: Frames every busy stack of a thread passes through (interpreter start, thread start, the
#: event loop's own loop): in "total" they would only ever read 100%.
_WRAPPERS = (
    "<frozen runpy>",
    "<module> (",
    "main (",
    "asyncio/runners.py",
    "BaseEventLoop.run_forever",
    "BaseEventLoop.run_until_complete",
    "Thread._bootstrap",
    "Thread.run (",
    "BaseEventLoop._run_once",
    "Handle._run (",
)


@dataclass(frozen=True)
class Recording:
    """What one profiling run wrote, and the node's CPU seconds by thread group meanwhile."""

    svg: Path
    raw: Path
    seconds: float
    threads: dict[str, float]


def py_spy() -> str:
    """The py-spy executable next to this interpreter, else the one on PATH."""
    local = Path(sys.executable).with_name("py-spy")
    found = str(local) if local.exists() else shutil.which("py-spy")
    if found is None:
        raise FileNotFoundError("py-spy is not installed (it is in the dev extras: make setup)")
    return found


def record(pid: int, out: Path, name: str, seconds: float, rate: int = 100) -> Recording:
    """Both recordings of `pid`, one after the other (blocks for about 2 x `seconds`)."""
    out.mkdir(parents=True, exist_ok=True)
    before = procstat.thread_cpu_seconds(pid)
    svg, raw = out / f"{name}.svg", out / f"{name}.txt"
    base = [
        py_spy(),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(rate),
    ]
    for extra in (["-o", str(svg)], ["--native", "--gil", "--format", "raw", "-o", str(raw)]):
        subprocess.run([*base, *extra], check=True, capture_output=True, text=True, timeout=seconds + 60)
    threads = procstat.thread_groups(pid, before, procstat.thread_cpu_seconds(pid))
    return Recording(svg, raw, seconds, threads)


class BackgroundProfile:
    """`record` on a thread, started when a point's window opens: `start` is a runner WindowHook."""

    def __init__(self, pid: int, out: Path, name: str, seconds: float) -> None:
        self.pid, self.out, self.name, self.seconds = pid, out, name, seconds
        self.recording: Recording | None = None
        self.error: BaseException | None = None

    def start(self) -> Callable[[], None]:
        def work() -> None:
            try:
                self.recording = record(self.pid, self.out, self.name, self.seconds)
            except (OSError, subprocess.SubprocessError) as exc:
                self.error = exc

        thread = threading.Thread(target=work, name="py-spy", daemon=True)
        thread.start()
        return lambda: thread.join(2 * self.seconds + 120)


def parse_collapsed(lines: Iterable[str]) -> list[tuple[list[str], int]]:
    """(frames root first, sample count) per line of py-spy's raw output."""
    stacks: list[tuple[list[str], int]] = []
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def function_of(frame: str) -> str:
    """`name (file:line)` -> `name (file)`: one entry per function, not per line."""
    return _LINE.sub(r" (\1)", frame)


def area_of(frame: str) -> str:
    return next((area for area, marker in AREAS if marker in frame), "other")


def innermost_python(frames: list[str]) -> str:
    """The deepest Python frame of a stack: whose work a native leaf was doing."""
    return next((function_of(f) for f in reversed(frames) if _PYTHON.search(f)), "(no Python frame)")


def summarize(stacks: list[tuple[list[str], int]], top: int = 12) -> dict[str, Any]:
    """Samples per area (of the leaf), per leaf function, per innermost Python function, and per
    function anywhere on the stack, as counts and percentages of all samples."""
    total = sum(count for _, count in stacks) or 1
    own: Counter[str] = Counter()
    python: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    for frames, count in stacks:
        if not frames:
            continue
        own[function_of(frames[-1])] += count
        python[innermost_python(frames)] += count
        areas[area_of(frames[-1])] += count
        # Python frames only: native frames on the way (task_step, Cython addresses) carry no names.
        python_frames = (f for f in frames if _PYTHON.search(f) and not any(w in f for w in _WRAPPERS))
        for function in {function_of(f) for f in python_frames}:
            inclusive[function] += count

    def table(counter: Counter[str], limit: int | None = top) -> list[dict[str, Any]]:
        return [
            {"name": k, "samples": v, "percent": 100.0 * v / total} for k, v in counter.most_common(limit)
        ]

    return {
        "samples": total,
        "areas": table(areas, None),  # few enough to show them all
        "self": table(own),
        "python": table(python),
        "total": table(inclusive),
    }


def summarize_file(path: Path, top: int = 12) -> dict[str, Any]:
    with path.open() as lines:
        return summarize(parse_collapsed(lines), top)
