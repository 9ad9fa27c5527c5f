"""The tutorial's helpers (docs/your-own-mesh.md): its files, its commands run in a folder with
the installed `onnxmesh`, and `onnxmesh up` as a process; shared by the tests that follow it."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.support import ROOT

TUTORIAL = ROOT / "docs" / "your-own-mesh.md"
BIN = Path(sys.executable).parent
_FILE = re.compile(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```\n", re.DOTALL)
READY = re.compile(r"onnxmesh ready: orchestrator (\S+) ")
STARTUP_S = 180.0


def tutorial_files() -> dict[str, str]:
    return dict(_FILE.findall(TUTORIAL.read_text()))


def run(folder: Path, *command: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        command, cwd=folder, capture_output=True, text=True, timeout=300, env=env, check=False
    )


class Mesh:
    """`onnxmesh up` as a process, its output read line by line off a thread."""

    def __init__(self, folder: Path, env: dict[str, str] | None = None) -> None:
        env = {**os.environ, **(env or {}), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        self.proc = subprocess.Popen(
            [str(BIN / "onnxmesh"), "up", "mesh.yaml", "--base-port", "0", "--no-restart"],
            cwd=folder,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        #: The orchestrator's address, once ready() has seen the ready line.
        self.orchestrator = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def ready(self) -> str:
        """The orchestrator's address, once the ready line is printed."""
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if match := READY.search(line):
                self.orchestrator = match[1]
                return self.orchestrator
        raise AssertionError("onnxmesh up never got ready:\n" + "\n".join(self.seen[-40:]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of its group is left
        self.proc.wait(10)
        self._reader.join(10)  # it reads to the end of the output, then the pipe can close
        if not self._reader.is_alive() and self.proc.stdout is not None:
            self.proc.stdout.close()
