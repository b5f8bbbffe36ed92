"""``tandem serve`` as a user runs it: one process, embedded Redis, in-process ranker."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tandem.testing.processes import REPO, free_port, tandem_server
from tandem.testing.stack import ITEM_DIM, make_tiny_ranker_run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_retriever_run: Path, tiny_llm_dir: Path, tiny_lora_dir: Path):
    """A fresh artifacts folder: the dataset, the retriever run, an LLM and a ranker run."""
    from retriever.core import Retriever

    source = tiny_retriever_run.resolve().parents[2]
    root = tmp_path_factory.mktemp("embedded") / "artifacts"
    shutil.copytree(source, root, ignore=shutil.ignore_patterns("redis"))
    retriever = Retriever.load(tiny_retriever_run)
    dataset = retriever.manifest.dataset
    shutil.copytree(tiny_llm_dir, root / "llm")
    make_tiny_ranker_run(
        root / dataset / "ranker" / "tiny-ranker", root / "llm", tiny_lora_dir,
        item_dim=ITEM_DIM, user_dim=retriever.dim, dataset=dataset,
    )  # fmt: skip
    return root, dataset


def test_embedded_stack_publishes_features_and_ranks(artifacts, tmp_path):
    root, dataset = artifacts
    env = {"TANDEM_ARTIFACTS_DIR": str(root), "TANDEM_DATASET": dataset, "TANDEM_REDIS_URL": ""}
    server = tandem_server("embedded", free_port(), tmp_path / "serve.log", env)
    server.start(timeout_s=180)
    try:
        from tandem.data import Dataset

        user = Dataset.load(root / dataset / "data").interactions.user_ids[0]
        response = httpx.post(server.url + "/recommend", json={"user_id": user, "k": 3}, timeout=30)
        assert response.status_code == 200, server.logs()
        body = response.json()
        assert body["degraded"] == [] and len(body["items"]) == 3
        assert body["model"]["feature_version"] == 1
        assert body["model"]["ranker_run"] == "tiny-ranker"
        assert "ranker" in body["timings_ms"]
        assert httpx.get(server.url + "/readyz").status_code == 200
        assert "serving on uvloop + httptools" in server.logs()  # what the benchmarks measure
    finally:
        server.stop()
    assert (root / "redis").is_dir()  # the embedded server kept its data under artifacts/


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, their children, ...)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _working_in(folder: Path) -> set[int]:
    """Live processes whose working directory is ``folder`` (redis-server runs in its data dir)."""
    pids = set()
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if cwd.resolve() == folder.resolve():
                pids.add(int(cwd.parent.name))
        except OSError:
            continue
    return pids


def _alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (zombies, already dead, do not count)."""
    running = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.add(pid)
    return running


def test_sigterm_stops_the_embedded_redis_with_the_app(artifacts, tmp_path):
    root, dataset = artifacts
    env = {
        "TANDEM_ARTIFACTS_DIR": str(root),
        "TANDEM_DATASET": dataset,
        "TANDEM_REDIS_URL": "",
        # the fallback loop and parser shut down the same way
        "TANDEM_SERVER_LOOP": "asyncio",
        "TANDEM_SERVER_HTTP": "h11",
    }
    server = tandem_server("embedded", free_port(), tmp_path / "serve.log", env)
    server.start(timeout_s=180)
    assert server.process is not None
    assert "serving on asyncio + h11" in server.logs()
    spawned = _descendants(server.process.pid) | _working_in(root / "redis")
    try:
        assert _working_in(root / "redis"), "the embedded redis-server is not running"
        server.process.send_signal(signal.SIGTERM)  # the process alone, as Ctrl-C or k8s do
        # uvicorn shuts down gracefully, then re-raises the signal: the exit hooks never run
        assert server.process.wait(60) in (0, -signal.SIGTERM), server.logs()
        assert "Application shutdown complete" in server.logs()
        deadline = time.monotonic() + 15
        while _alive(spawned) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(spawned), f"survived the app: {_alive(spawned)}\n{server.logs()}"
    finally:
        server.stop()
        for pid in _alive(spawned):  # a failed run leaves no orphan behind either
            os.kill(pid, signal.SIGKILL)


def test_missing_artifacts_fail_fast_with_a_clear_message(tmp_path):
    env = {**os.environ, "TANDEM_ARTIFACTS_DIR": str(tmp_path / "empty"), "TANDEM_REDIS_URL": ""}
    result = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "serve", "--port", str(free_port())],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "tandem retriever train" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_missing_llm_fails_fast_and_names_the_fix(artifacts, tmp_path):
    root, dataset = artifacts
    env = {
        **os.environ,
        "TANDEM_ARTIFACTS_DIR": str(root),
        "TANDEM_DATASET": dataset,
        "TANDEM_LLM_DIR": str(tmp_path / "no-llm"),
        "TANDEM_REDIS_URL": "",
    }
    result = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "serve", "--role", "gateway", "--port", "1"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "tandem llm prepare" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
