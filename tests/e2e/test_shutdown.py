"""Stopping without losing a call, with a stock client (tritonclient, no retries) calling real
processes: a node's drain on SIGTERM, `make run`'s Ctrl-C, and a launcher killed outright.

tritonclient registers the same `inference.*` protobuf package as our stubs, so it runs in its
own process, as a real client would.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshctl.process import ServiceProcess, wait_serving
from tests.support import ROOT

DRAIN_DELAY = 2.0
#: How long a test waits for a process to exit or a line to come before it calls it a failure.
BOUND_S = 60.0

# Calls digits-mlp in a loop, SIGTERMs the node after some answers, and keeps calling: one JSON
# record per call made after the signal: [seconds since the signal at its end, ready, ok, error].
DRAIN_CLIENT = textwrap.dedent(
    """
    import json, os, signal, sys, time
    import numpy as np
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    address, pid = sys.argv[1], int(sys.argv[2])
    client = tc.InferenceServerClient(address)
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    tensor = tc.InferInput("features", [1, 64], "FP32")
    tensor.set_data_from_numpy(x)
    for _ in range(20):
        client.infer("digits-mlp", [tensor])
    os.kill(pid, signal.SIGTERM)
    signalled = time.monotonic()
    calls, failures = [], 0
    while failures < 20 and time.monotonic() - signalled < 60:
        ready = None
        try:
            ready = client.is_server_ready()
            client.infer("digits-mlp", [tensor])
            ok, error = True, ""
        except InferenceServerException as exc:
            ok, error, failures = False, f"{exc.status()} {exc.message()}", failures + 1
        calls.append([time.monotonic() - signalled, ready, ok, error])
    print(json.dumps(calls))
    """
)

# Closed-loop callers on a graph until the server says it is not ready (what a health-checking
# balancer does for a stock client); prints `calling` once every caller got an answer, then one
# JSON object at the end: answers and failures.
LOAD_CLIENT = textwrap.dedent(
    """
    import json, sys, threading
    import numpy as np
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    address, graph, callers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    image = np.arange(64, dtype=np.uint8).reshape(1, 8, 8) % 17
    stop = threading.Event()
    answered = threading.Barrier(callers + 1)
    ok, failed = [0] * callers, []

    def call(i):
        client = tc.InferenceServerClient(address)
        tensor = tc.InferInput("image", [1, 8, 8], "UINT8")
        tensor.set_data_from_numpy(image)
        first = True
        while not stop.is_set():
            try:
                client.infer(graph, [tensor])
                ok[i] += 1
            except InferenceServerException as exc:
                failed.append(f"{exc.status()} {exc.message()}"[:300])
            if first:
                first = False
                answered.wait()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    answered.wait()
    print("calling", flush=True)
    watcher = tc.InferenceServerClient(address)
    while not stop.wait(0.05):  # the health-check interval
        try:
            if not watcher.is_server_ready():
                stop.set()
        except InferenceServerException:
            stop.set()
    for t in threads:
        t.join()
    print(json.dumps({"ok": sum(ok), "failed": failed}), flush=True)
    """
)


def running(pid: int) -> bool:
    """Whether `pid` runs (a zombie nobody reaped yet has stopped running)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def model_a() -> Iterator[ServiceProcess]:
    command = [
        *(sys.executable, "-m", "services.common.model_node", "--name", "model_a"),
        *("--model-dir", str(ROOT / "services/model_a/models"), "--port", "0", "--http-port", "off"),
    ]
    command += ["--drain-delay", str(DRAIN_DELAY), "--grace", "5", "--log-format", "text"]
    proc = ServiceProcess("model_a", 1, "127.0.0.1", 0, command, os.environ, None)
    try:
        wait_serving([proc], BOUND_S, threading.Event())
        yield proc
    finally:
        proc.kill()


def test_a_draining_node_answers_every_call_for_its_drain_delay(model_a: ServiceProcess) -> None:
    client = subprocess.run(
        [sys.executable, "-c", DRAIN_CLIENT, model_a.address, str(model_a.pid)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BOUND_S + 30,
    )
    assert client.returncode == 0, client.stderr
    calls = json.loads(client.stdout)
    assert model_a.wait(BOUND_S) == 0, "\n".join(model_a.tail)
    answered = [c for c in calls if c[2]]
    failed = [c for c in calls if not c[2]]
    # The node refuses nothing before its drain delay has passed since the signal...
    assert all(c[0] >= DRAIN_DELAY for c in failed), failed[:3]
    # ... while it already says it is not ready, so balancers move away.
    assert any(not ready for _, ready, ok, _ in answered), calls[:5]
    # Then new calls are refused: UNAVAILABLE from the node, the port closed, or CANCELLED for
    # a call that reached the server as it closed.
    assert failed, "the node never stopped answering"
    refused = re.compile(r"StatusCode\.(UNAVAILABLE|CANCELLED) ")
    assert all(refused.match(c[3]) for c in failed), failed[:3]


def launch(*args: str) -> tuple[subprocess.Popen[str], list[str]]:
    """`python -m meshctl.run` in a session of its own (as a terminal runs `make run`), until ready."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshctl.run", "--base-port", "0", *args],
        cwd=ROOT,
        env={**os.environ, "ONNXMESH_DRAIN_DELAY": str(DRAIN_DELAY)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("onnxmesh ready:"):
            return proc, lines
    proc.wait(BOUND_S)
    raise AssertionError("the mesh never got ready:\n" + "".join(lines))


def node_pids(lines: list[str]) -> list[int]:
    return [int(line.split(" pid ")[1]) for line in lines if line.startswith("  ") and " pid " in line]


def test_ctrl_c_of_make_run_stops_in_order_and_fails_no_call() -> None:
    proc, lines = launch()
    load: subprocess.Popen[str] | None = None
    try:
        address = re.search(r"orchestrator (\S+) \(graphs", lines[-1])
        assert address, lines[-1]
        load = subprocess.Popen(
            [sys.executable, "-c", LOAD_CLIENT, address[1], "digits-serial", "4"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert load.stdout is not None and load.stdout.readline().strip() == "calling"
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        report, errors = load.communicate(timeout=BOUND_S)
        rest, _ = proc.communicate(timeout=BOUND_S)
    finally:
        for child in (load, proc):
            if child is not None and child.poll() is None:
                child.kill()
                child.wait()
    assert load.returncode == 0, errors
    outcome = json.loads(report)
    assert outcome["ok"] > 0 and outcome["failed"] == [], outcome
    assert proc.returncode == 0, rest
    assert re.search(r"^onnxmesh: stopped cleanly \(", rest, re.M), rest
    # The orchestrator was stopped first: the services began draining only once it had exited.
    out = rest.splitlines()
    last_orchestrator_line = max(i for i, line in enumerate(out) if line.startswith("[orchestrator-1] "))
    services_draining = [
        i for i, line in enumerate(out) if re.match(r"\[(?!orchestrator)\S+\] \S+ draining$", line)
    ]
    assert len(services_draining) == 3 and min(services_draining) > last_orchestrator_line, rest
    assert not any(running(pid) for pid in node_pids(lines))


def test_a_killed_launcher_leaves_no_node_behind() -> None:
    proc, lines = launch("--no-orchestrator")
    pids = node_pids(lines)
    assert len(pids) == 3
    proc.kill()  # SIGKILL: no chance to stop anything
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()
    deadline = time.monotonic() + BOUND_S
    while any(running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)  # poll interval
    left = [pid for pid in pids if running(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"nodes still running after their launcher was killed: {left}"
