"""``tandem.testing.processes``: the servers tests and benchmarks start are never left behind."""

from __future__ import annotations

import sys

import pytest

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
