"""A real vLLM CPU server, launched with the deployment launcher's own command (CPU profile).

``start_vllm_server`` serves a model directory (plus LoRA adapters) on a free loopback port, in
its own process group, logging to a file whose tail explains a failed start. Start-up takes
~30-60 s and ~2 GB RSS.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tandem.testing.processes import free_port

if TYPE_CHECKING:
    from deploy.vllm.launch import LaunchConfig  # tandem imports deployment code only lazily

READY_TIMEOUT_S = 300.0  # cold imports on a loaded 2-core machine take most of this
LOG_TAIL_LINES = 80


@dataclass
class VLLMServer:
    url: str
    model_dir: Path
    adapters: dict[str, Path]
    log_path: Path
    process: subprocess.Popen
    config: LaunchConfig = field(repr=False)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def children(self) -> list[int]:
        """Process ids in the server's process group other than the API server itself."""
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != self.process.pid:
                with contextlib.suppress(OSError):
                    if os.getpgid(int(entry.name)) == self.process.pid:
                        pids.append(int(entry.name))
        return pids

    def kill_engine(self) -> None:
        """SIGKILL the engine and worker processes: what an engine crash looks like."""
        for pid in self.children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to the whole group (API server, engine, workers), SIGKILL if it lingers."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        for pid in self.children():  # orphans left by a crash
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def start_vllm_server(
    model_dir: Path,
    adapters: dict[str, Path],
    log_path: Path,
    ready_timeout_s: float = READY_TIMEOUT_S,
    **config_overrides,
) -> VLLMServer:
    """Launch, wait for /health, warm up; on failure raise with the log tail."""
    from deploy.vllm.launch import LaunchConfig, LaunchError, build_command, build_env, wait_healthy
    from deploy.vllm.launch import warm_up as launcher_warm_up

    options = {
        "max_model_len": 1024,
        "max_num_seqs": 8,
        "kv_cache_bytes": 64 * 1024**2,  # plenty for the tiny model's 2 layers
        **config_overrides,
    }
    config = LaunchConfig(
        profile="cpu",
        model=str(model_dir),
        host="127.0.0.1",
        port=free_port(),
        lora_modules=tuple(f"{name}={path}" for name, path in adapters.items()),
        **options,
    )
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["nice", "-n", "10", *build_command(config)],
            env=build_env(config),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: one signal reaches every process
        )
    server = VLLMServer(config.url, model_dir, dict(adapters), log_path, process, config)
    try:
        wait_healthy(server.url, ready_timeout_s, process)
        launcher_warm_up(server.url, config.served_model_name, timeout_s=120)
    except (LaunchError, OSError) as exc:
        server.stop()
        tail = server.log_tail()
        raise RuntimeError(f"vLLM did not start: {exc}\n--- {log_path} ---\n{tail}") from None
    return server
