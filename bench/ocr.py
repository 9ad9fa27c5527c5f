"""`python -m bench.ocr`: the OCR example's mesh against the same steps in one process.

Three ways to read the same rendered pages, closed loop (each of `c` workers sends a page, waits
for its answer, sends the next) at each concurrency:

- `mesh`: examples/ocr/mesh.yaml, every step its own process (`onnxmesh up`), graph `ocr`;
- `all-in-one`: the same model.py steps and ONNX files called one after the other in one process
  behind one gRPC server (examples/ocr/all-in-one, the Python runtime on one node);
- `reference`: RapidOCR() called in this process (threads), no gRPC at all: the floor.

Modes alternate within each round (the machine is shared: a burst of someone else's load then
hits both). Reported per mode and concurrency: p50/p99 latency, throughput, server CPU per page
(every process of the mesh; the node; this process for the reference), the machine's other load,
and for the mesh each step's time per page (its node's, from /metrics) and the hop around it (the
orchestrator's step time minus the node's). Targets, as ratios of one run: mesh throughput >= 1.0x
the all-in-one's at c >= 4, mesh p50 <= 1.15x the all-in-one's at c = 1.

    python -m bench.ocr --rounds 2 --duration 8 --concurrency 1,4,16
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bench.load import procstat
from bench.runner import Scrape, free_port, scrape, scraped_delta
from services.common.errors import MeshError
from services.common.grpc.client import OipClient

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ocr"
BIN = Path(sys.executable).parent
OUT = ROOT / "bench" / "out"
STARTUP_S = 240.0
MODES = ("mesh", "all-in-one", "reference")
#: The mesh's steps: (orchestrator step, service) in graph order.
STEPS = (
    ("pre", "decode"),
    ("det", "detect"),
    ("lines", "boxes"),
    ("angle", "angle"),
    ("turn", "rotate"),
    ("rec", "recognize"),
    ("text", "ctc"),
)
NODE_TIME = "onnxmesh_request_duration_seconds"
STEP_TIME = "onnxmesh_step_duration_seconds"
_ENDPOINT = re.compile(r"^\s*(\S+)-1\s+grpc (\S+)\s.*metrics (\S+)\s+pid (\d+)")
_READY = re.compile(r"onnxmesh ready: orchestrator (\S+) ")


def page(
    lines: Sequence[tuple[str, int]],
    size: tuple[int, int] = (720, 360),
    *,
    angle: float = 0,
    fmt: str = "PNG",
) -> bytes:
    """Black lines of text (text, font size) on white, top to bottom, then turned by `angle`;
    Pillow's default scalable font."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    y = 24
    for text, font_size in lines:
        draw.text((28, y), text, fill="black", font=ImageFont.load_default(size=font_size))
        y += int(font_size * 1.8)
    if angle:
        image = image.rotate(angle, expand=True, fillcolor="white")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def pages() -> list[bytes]:
    """What the benchmark reads: small documents of three to five lines, one upside down."""
    return [
        page([("Invoice 2026-12-07", 28), ("Total due: 1,234.50 EUR", 28), ("Paid by card", 28)], (800, 480)),
        page(
            [
                ("Order 42 shipped", 32),
                ("Tracking AB-4471", 24),
                ("Two parcels", 24),
                ("Signed on delivery", 24),
            ],
            (800, 480),
        ),
        page(
            [("Meeting notes", 36), ("Budget approved", 24), ("Next review in May", 24)],
            (800, 480),
            fmt="JPEG",
        ),
        page([("Upside down receipt", 30), ("Coffee 3.20", 30), ("Bagel 2.80", 30)], (800, 480), angle=180),
        page(
            [
                ("Quarterly report", 40),
                ("Revenue up 12 percent", 28),
                ("Costs flat", 28),
                ("Headcount 57", 28),
                ("Outlook stable", 28),
            ],
            (900, 600),
        ),
    ]


@dataclass
class Point:
    """One mode at one concurrency, over every round."""

    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cpu_s: float = 0.0
    others_cpu_s: float = 0.0
    wrong: int = 0
    #: Failed calls by error type (a loaded machine can exceed a step's timeout).
    errors: dict[str, int] = field(default_factory=dict)
    #: step -> [node seconds, orchestrator step seconds], summed over the windows (the mesh only).
    steps: dict[str, list[float]] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        done = len(self.latencies)
        ms = sorted(1000 * s for s in self.latencies)
        return {
            "pages": done,
            "p50_ms": statistics.median(ms) if ms else None,
            "p99_ms": ms[min(done - 1, int(0.99 * done))] if ms else None,
            "pages_per_s": done / self.seconds if self.seconds else 0.0,
            "cpu_ms_per_page": 1000 * self.cpu_s / done if done else None,
            "others_cores": self.others_cpu_s / self.seconds if self.seconds else 0.0,
            "wrong": self.wrong,
            "errors": dict(self.errors),
            "steps_ms_per_page": {
                step: {"node": 1000 * node / done, "hop": 1000 * (total - node) / done}
                for step, (node, total) in self.steps.items()
            }
            if done
            else {},
        }


class Server:
    """A process serving OIP (the mesh's `onnxmesh up`, or the all-in-one node), its output read
    off a thread; always stopped."""

    def __init__(self, command: list[str], cwd: Path, ready: re.Pattern[str]) -> None:
        self.proc = subprocess.Popen(
            command,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._pattern = ready
        self.address = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if not self._ready.is_set() and (match := self._pattern.search(line)):
                self.address = match[1]
                self._ready.set()

    def wait_ready(self) -> str:
        deadline = time.monotonic() + STARTUP_S
        while not self._ready.wait(0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("never got ready:\n" + "\n".join(self.lines[-30:]))
        return self.address

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def mesh_server() -> Server:
    command = [str(BIN / "onnxmesh"), "up", "mesh.yaml", "--base-port", "0", "--no-restart", "--metrics"]
    return Server(command, EXAMPLE, _READY)


def all_in_one_server() -> Server:
    port = free_port()
    command = [sys.executable, "-m", "services.common.model_node", "--name", "ocr", "--runtime", "python"]
    command += ["--model-dir", str(EXAMPLE / "all-in-one"), "--port", str(port), "--metrics-port", "off"]
    return Server(command, ROOT, re.compile(rf"ready on (127\.0\.0\.1:{port})"))


async def closed_loop(
    call: Callable[[bytes], Awaitable[list[str]]],
    images: Sequence[bytes],
    expected: Sequence[list[str]],
    concurrency: int,
    warmup: float,
    duration: float,
    measure: Callable[[], None],
    errors: dict[str, int],
) -> tuple[list[float], int, float]:
    """Latencies of the answers completed inside the window, wrong answers, the window's length;
    failed calls inside it counted in `errors` by type. `measure` is called as the window opens
    and as it closes."""
    start = time.monotonic()
    opened, closed = start + warmup, start + warmup + duration
    latencies: list[float] = []
    wrong = 0

    async def worker(index: int) -> None:
        nonlocal wrong
        i = index
        while (sent := time.monotonic()) < closed:
            try:
                texts = await call(images[i % len(images)])
            except MeshError as exc:
                if opened <= time.monotonic() <= closed:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                i += concurrency
                continue
            done = time.monotonic()
            # Answers completed inside the window count, whenever they were sent.
            if opened <= done <= closed:
                latencies.append(done - sent)
                wrong += texts != expected[i % len(images)]
            i += concurrency

    async def window() -> None:
        await asyncio.sleep(warmup)
        measure()
        await asyncio.sleep(duration)
        measure()

    await asyncio.gather(window(), *(worker(i) for i in range(concurrency)))
    return latencies, wrong, duration


def node_pids(server: Server) -> dict[str, int]:
    """Every process of a server: the mesh's nodes from its ready table, else the node itself."""
    found = {m[1]: int(m[4]) for line in server.lines if (m := _ENDPOINT.match(line))}
    return found or {"node": server.proc.pid}


def metrics_urls(server: Server) -> dict[str, str]:
    return {m[1]: f"http://{m[3]}/metrics" for line in server.lines if (m := _ENDPOINT.match(line))}


def measure_point(
    mode: str,
    point: Point,
    server: Server | None,
    call: Callable[[bytes], Awaitable[list[str]]],
    images: Sequence[bytes],
    expected: Sequence[list[str]],
    concurrency: int,
    warmup: float,
    duration: float,
) -> None:
    pids = node_pids(server) if server else {"bench": os.getpid()}
    urls = metrics_urls(server) if server and mode == "mesh" else {}
    snaps: list[tuple[procstat.CpuSnapshot, dict[str, Scrape]]] = []

    def measure() -> None:
        scraped = {name: scrape(url, (NODE_TIME, STEP_TIME)) for name, url in urls.items()}
        snaps.append((procstat.snapshot(pids), scraped))

    latencies, wrong, seconds = asyncio.run(
        closed_loop(call, images, expected, concurrency, warmup, duration, measure, point.errors)
    )
    (cpu0, m0), (cpu1, m1) = snaps
    used = procstat.usage(cpu0, cpu1)
    ours = used.total(pids)
    point.latencies += latencies
    point.seconds += seconds
    point.cpu_s += ours
    point.others_cpu_s += max(0.0, used.machine_busy_s - ours)
    point.wrong += wrong
    for step, service in STEPS if urls else ():
        node = scraped_delta(m0[service], m1[service], f"{NODE_TIME}_sum")
        total = scraped_delta(m0["orchestrator"], m1["orchestrator"], f"{STEP_TIME}_sum", step=step)
        sums = point.steps.setdefault(step, [0.0, 0.0])
        sums[0] += node
        sums[1] += total


def texts_of(outputs: dict[str, np.ndarray]) -> list[str]:
    return [t.decode() for t in outputs["texts"]]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from rapidocr_onnxruntime import RapidOCR  # the reference: only this benchmark and the tests need it

    # One onnxruntime thread per session, as every node of the mesh and the all-in-one run.
    reference = RapidOCR(intra_op_num_threads=1, inter_op_num_threads=1)
    images = pages()
    expected = [[text for _, text, _ in (reference(data)[0] or [])] for data in images]
    pool = ThreadPoolExecutor(max(args.concurrency))

    async def read_in_process(data: bytes) -> list[str]:
        found, _ = await asyncio.get_running_loop().run_in_executor(pool, reference, data)
        return [text for _, text, _ in (found or [])]

    def over_grpc(address: str, model: str) -> Callable[[bytes], Awaitable[list[str]]]:
        clients: dict[int, OipClient] = {}

        async def call(data: bytes) -> list[str]:
            # One channel per event loop (each point runs its own loop).
            loop = id(asyncio.get_running_loop())
            if loop not in clients:
                clients[loop] = OipClient(address)
            result = await clients[loop].infer(model, {"image": np.array([data], dtype=object)}, timeout=120)
            return texts_of(result.outputs)

        return call

    points: dict[tuple[str, int], Point] = {}
    load_before = os.getloadavg()
    with running(mesh_server()) as mesh, running(all_in_one_server()) as aio:
        callers = {
            "mesh": (mesh, over_grpc(mesh.address, "ocr")),
            "all-in-one": (aio, over_grpc(aio.address, "ocr-all")),
            "reference": (None, read_in_process),
        }
        for round_ in range(args.rounds):
            for c in args.concurrency:
                order = [m for m in args.modes if m != "reference" or c in args.reference_concurrency]
                for mode in order if round_ % 2 == 0 else order[::-1]:
                    server, call = callers[mode]
                    point = points.setdefault((mode, c), Point())
                    measure_point(mode, point, server, call, images, expected, c, args.warmup, args.duration)
                    row = point.row()
                    print(
                        f"round {round_ + 1} {mode:<10} c={c:<3} {row['pages']} pages  "
                        f"{row['pages_per_s']:.2f} pages/s  others {row['others_cores']:.2f} cores",
                        file=sys.stderr,
                        flush=True,
                    )
    return {
        "pages": len(images),
        "lines_per_page": [len(e) for e in expected],
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cores": os.cpu_count(),
        "points": [{"mode": m, "concurrency": c, **p.row()} for (m, c), p in points.items()],
    }


def targets(result: dict[str, Any]) -> list[str]:
    by = {(p["mode"], p["concurrency"]): p for p in result["points"]}
    out = []
    for (mode, c), p in sorted(by.items()):
        aio = by.get(("all-in-one", c))
        if mode != "mesh" or aio is None or not aio["pages"] or not p["pages"]:
            continue
        if c == 1:
            ratio = p["p50_ms"] / aio["p50_ms"]
            out.append(
                f"c=1: mesh p50 {ratio:.2f}x the all-in-one's (target <= 1.15): {'met' if ratio <= 1.15 else 'MISSED'}"
            )
        if c >= 4:
            ratio = p["pages_per_s"] / aio["pages_per_s"]
            out.append(
                f"c={c}: mesh throughput {ratio:.2f}x the all-in-one's (target >= 1.0): {'met' if ratio >= 1.0 else 'MISSED'}"
            )
    return out


def table(result: dict[str, Any]) -> str:
    lines = [
        "| mode | c | pages | p50 ms | p99 ms | pages/s | server CPU ms/page | other load (cores) | wrong | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in sorted(result["points"], key=lambda p: (p["concurrency"], MODES.index(p["mode"]))):
        lines.append(
            f"| {p['mode']} | {p['concurrency']} | {p['pages']} | {_f(p['p50_ms'])} | {_f(p['p99_ms'])} | "
            f"{p['pages_per_s']:.2f} | {_f(p['cpu_ms_per_page'])} | {p['others_cores']:.2f} | {p['wrong']} | "
            f"{sum(p['errors'].values())} |"
        )
    for p in result["points"]:
        if p["mode"] == "mesh" and p["steps_ms_per_page"]:
            lines += [
                "",
                f"Mesh steps at c={p['concurrency']}, ms per page: in the node / around it (hop, queue, codec)",
                "",
            ]
            lines += ["| step | node | hop |", "|---|---|---|"]
            lines += [
                f"| {s} | {v['node']:.1f} | {v['hop']:.1f} |" for s, v in p["steps_ms_per_page"].items()
            ]
    return "\n".join(lines)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=_ints, default=(1, 4, 16), help="default: 1,4,16")
    parser.add_argument("--reference-concurrency", type=_ints, default=(1, 4, 16), help="default: 1,4,16")
    parser.add_argument(
        "--modes", type=lambda t: tuple(t.split(",")), default=MODES, help=f"default: {','.join(MODES)}"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds over every mode and concurrency (default: 2)"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each window (default: 2)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of each window (default: 8)")
    parser.add_argument(
        "--out", type=Path, default=OUT / "ocr.json", help="the JSON results (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print()
    print(
        f"load average before/after: {result['loadavg_before']} / {result['loadavg_after']} on {result['cores']} cores"
    )
    for line in targets(result):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
