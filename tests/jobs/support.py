"""Helpers for the jobs tests: a PostgreSQL server of our own, node processes, online answers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from demo import digits
from services.common.grpc.client import OipClient
from tests.support import free_port

REPO = Path(__file__).resolve().parents[2]
#: The held-out digits file itself (package data; a regular file in a checkout).
HOLDOUT = Path(str(digits.HOLDOUT))


def holdout() -> tuple[np.ndarray, np.ndarray]:
    data = digits.load_holdout()
    return data.images, data.labels


def online_answers(target: str, graph: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of the online path: one ModelInfer per image, as a client would."""

    async def ask() -> list[tuple[np.ndarray, np.ndarray]]:
        async with OipClient(target) as client:
            sem = asyncio.Semaphore(16)

            async def one(i: int) -> tuple[np.ndarray, np.ndarray]:
                async with sem:
                    result = await client.infer(graph, {"image": images[i : i + 1]}, timeout=10.0)
                return result.outputs["label"][0], result.outputs["probabilities"][0]

            return await asyncio.gather(*(one(i) for i in range(len(images))))

    answers = asyncio.run(ask())
    return np.array([a[0] for a in answers]), np.stack([a[1] for a in answers])


# -- PostgreSQL ------------------------------------------------------------------------------------


def postgres_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust auth, fsync off: test data only)."""

    bindir: Path
    root: Path
    port: int
    as_user: list[str]

    @classmethod
    def start(cls) -> Postgres:
        """Start one; RuntimeError saying why when it does not start (installed or not)."""
        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (no initdb; apt-get install postgresql)")
        root = Path(tempfile.mkdtemp(prefix="onnxmesh-pg-"))
        try:
            return cls._start(bindir, root)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise

    @classmethod
    def _start(cls, bindir: Path, root: Path) -> Postgres:
        as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "running as root and there is no 'postgres' user to run PostgreSQL"
                ) from None
            runuser = shutil.which("runuser")
            if runuser is None:
                raise RuntimeError("running as root and runuser is missing: cannot drop to 'postgres'")
            os.chown(root, account.pw_uid, account.pw_gid)
            as_user = [runuser, "-u", "postgres", "--"]
        server = cls(bindir, root, free_port(), as_user)
        data = root / "data"
        server._run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        settings = (
            "-c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        attempts = 3
        while True:
            options = f"-p {server.port} -k {root} {settings}"
            try:
                server._run(
                    "pg_ctl",
                    "-D",
                    str(data),
                    "-l",
                    str(root / "server.log"),
                    "-w",
                    "-t",
                    "60",
                    "-o",
                    options,
                    "start",
                )
                return server
            except RuntimeError as exc:
                # The port was free when picked, then released: another process may have taken it.
                attempts -= 1
                if attempts == 0 or "already in use" not in str(exc):
                    raise
                server.port = free_port()

    def _run(self, tool: str, *args: str) -> None:
        proc = subprocess.run(
            [*self.as_user, str(self.bindir / tool), *args],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        if proc.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stderr.strip()}\n{tail}")

    def create_database(self) -> str:
        """A fresh, empty database; its SQLAlchemy URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


# -- node processes --------------------------------------------------------------------------------


class Node:
    """`python -m jobs.service` / `jobs.worker` as a real process; the port is read from its stdout."""

    def __init__(self, module: str, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.command = [sys.executable, "-m", module, "--port", "0", "--log-format", "text", *args]
        self.port: int | None = None
        self.ready = threading.Event()
        self.lines: deque[str] = deque(maxlen=200)
        self.proc = subprocess.Popen(
            self.command,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            self.lines.append(line)
            words = line.split()
            if len(words) == 4 and words[1:3] == ["listening", "on"]:
                self.port = int(words[3].rsplit(":", 1)[1])
            if len(words) == 4 and words[1:3] == ["ready", "on"]:
                self.ready.set()

    def wait_ready(self, timeout: float = 30.0) -> Node:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                tail = "\n".join(self.lines)
                raise AssertionError(f"{' '.join(self.command)} never got ready:\n{tail}")
        return self

    @property
    def address(self) -> str:
        assert self.port is not None
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> int:
        # No SIGCONT first: a stopped process dies of SIGKILL as it is, without running again.
        self.signal(signal.SIGKILL)
        return self.wait(10.0)

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(2.0)
        if not self._reader.is_alive() and self.proc.stdout is not None:
            self.proc.stdout.close()  # read to its end by the reader
        return code
