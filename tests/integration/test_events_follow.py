"""``tandem events follow`` and ``export`` as real processes on a real Redis: the worker is
SIGKILLed mid-batch and restarted, and every event is applied exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from feature_store.event_log import EventLog
from feature_store.events import EventStore
from feature_store.live import Event
from tandem.data import prepare_files
from tandem.data.files import read_interactions
from tests.fixtures.data import synthetic_dataset
from tests.fixtures.services import publish_dataset

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
USERS, PER_USER = 6, 10
GROUP = "preferences"


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    dataset = synthetic_dataset()
    dataset.save(tmp_path / dataset.name / "data")
    return tmp_path


@pytest.fixture
async def streamed(redis_url, namespace, artifacts):
    """A published namespace with USERS x PER_USER events in its stream."""
    dataset = synthetic_dataset()
    publish_dataset(redis_url, namespace, dataset)
    store = EventStore(redis_url, namespace)
    users = dataset.interactions.user_ids[:USERS]
    batch = [
        Event(f"e{u}-{n}", user, dataset.catalog.item_ids[(u * 7 + n) % 60], ts=1e9 + n)
        for n in range(PER_USER)
        for u, user in enumerate(users)
    ]
    try:
        assert all((await store.ingest(batch)).accepted)
    finally:
        await store.close()
    return users


def tandem(artifacts: Path, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "TANDEM_ARTIFACTS_DIR": str(artifacts), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    command = [sys.executable, "-m", "tandem.cli", *args]
    return subprocess.Popen(command, env=env, cwd=REPO, **popen)


def follow_args(redis_url: str, namespace: str, llm: Path, *extra: str) -> list[str]:
    return [
        "events", "follow", "--dataset", "synthetic", "--llm", str(llm), "--min-events", "3",
        "--batch", "7", "--max-new-tokens", "8", "--threads", "1", "--consumer", "worker-a",
        "--redis-url", redis_url, "--namespace", namespace, *extra,
    ]  # fmt: skip


def test_a_worker_killed_mid_batch_loses_nothing_and_applies_nothing_twice(
    redis_url, namespace, artifacts, streamed, tiny_llm_dir, tmp_path
):
    log = EventLog(redis_url, namespace)
    client = redis.Redis.from_url(redis_url)
    stream = f"tandem:{namespace}:events"
    with (tmp_path / "first.log").open("wb") as out:
        worker = tandem(artifacts, *follow_args(redis_url, namespace, tiny_llm_dir),
                        stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 120
        killed_pending = 0
        while time.monotonic() < deadline and worker.poll() is None:
            applied = log.stats(GROUP).get("applied", 0) if _has_group(client, stream) else 0
            pending = client.xpending(stream, GROUP)["pending"] if applied else 0
            if applied >= 7 and pending:  # a batch is delivered and not yet committed
                worker.send_signal(signal.SIGKILL)
                killed_pending = pending
                break
            time.sleep(0.01)
        worker.wait(10)
    assert killed_pending, (tmp_path / "first.log").read_text()[-3000:]
    assert log.stats(GROUP)["applied"] < USERS * PER_USER

    restarted = tandem(
        artifacts, *follow_args(redis_url, namespace, tiny_llm_dir, "--exit-when-idle"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    output, _ = restarted.communicate(timeout=180)
    assert restarted.returncode == 0, output.decode()[-3000:]
    stats = log.stats(GROUP)
    assert stats["applied"] == USERS * PER_USER  # every entry once: none lost, none twice
    assert log.lag(GROUP) == 0
    assert stats["refreshed"] >= USERS  # each user crossed the threshold at least once
    for user in streamed:
        serving = log.serving_user(user)
        assert serving.user.preference is not None
        assert serving.user.watermark == len(serving.user.history)
    log.close()


def _has_group(client: redis.Redis, stream: str) -> bool:
    try:
        return any(g["name"] == GROUP.encode() for g in client.xinfo_groups(stream))
    except redis.ResponseError:
        return False


def test_export_writes_interactions_that_data_prepare_reads(
    redis_url, namespace, artifacts, streamed, tmp_path
):
    out = tmp_path / "events.csv"
    done = tandem(artifacts, "events", "export", str(out), "--redis-url", redis_url,
                  "--namespace", namespace, stdout=subprocess.PIPE)  # fmt: skip
    printed, _ = done.communicate(timeout=60)
    assert done.returncode == 0
    frame = read_interactions(out)
    assert len(frame) == USERS * PER_USER
    assert set(frame["user_id"]) == set(streamed)
    last = EventLog(redis_url, namespace).last_id()
    assert last in printed.decode()
    prepared = prepare_files("from-events", out)
    assert prepared.summary.interactions == USERS * PER_USER


def test_publish_records_the_snapshots_events_watermark_before_the_swap(
    redis_url, namespace, artifacts, streamed
):
    last = EventLog(redis_url, namespace).last_id()
    done = tandem(artifacts, "features", "publish", "--dataset", "synthetic", "--redis-url",
                  redis_url, "--namespace", namespace, "--events-through", last,
                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    output, _ = done.communicate(timeout=120)
    assert done.returncode == 0, output.decode()[-2000:]
    client = redis.Redis.from_url(redis_url)
    version = int(client.get(f"tandem:{namespace}:current"))
    manifest = client.hget(f"tandem:{namespace}:v{version}:schema", "manifest_id")
    assert client.hget(f"tandem:{namespace}:events:through", manifest).decode() == last
    user = EventLog(redis_url, namespace).serving_user(streamed[0]).user
    assert len(user.history) == len(synthetic_dataset().interactions.sequences()[0])
