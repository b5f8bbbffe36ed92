"""``--publish``: enrichment outputs reach the real feature store (Redis) as one version."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from enrichment.runs import read_preferences
from feature_store.client import FeatureStoreClient
from tandem.cli import app
from tandem.paths import dataset_dir
from tandem.testing.data import synthetic_dataset

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]


async def _read(url: str, namespace: str, user_ids: list[str], item_ids: list[str]):
    client = FeatureStoreClient(url, namespace, registry=CollectorRegistry(), deadline=2.0)
    try:
        users = [await client.read_user(u) for u in user_ids]
        items = await client.read_items(users[0].version, item_ids)
        return users, items
    finally:
        await client.close()


def test_preferences_and_captions_are_published_together(
    tmp_path, monkeypatch, chatty_llm_dir, redis_url, namespace
):
    monkeypatch.setenv("TANDEM_ARTIFACTS_DIR", str(tmp_path))
    dataset = synthetic_dataset(num_users=4, num_items=16, min_len=6, max_len=8)
    dataset.save(dataset_dir("synthetic"))
    runner = CliRunner()
    common = ["--dataset", "synthetic", "--llm", str(chatty_llm_dir)]
    captions = runner.invoke(app, ["enrich", "captions", *common, "--max-words", "6"])
    assert captions.exit_code == 0, captions.output
    result = runner.invoke(
        app,
        ["enrich", "preferences", *common, "--window", "4", "--stride", "2",
         "--max-new-tokens", "8", "--publish", "--redis-url", redis_url,
         "--namespace", namespace],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Published to namespace" in result.output

    run_dir = tmp_path / "synthetic" / "enrichment-preferences"
    stored = read_preferences(run_dir)
    users, items = asyncio.run(
        _read(redis_url, namespace, list(stored), dataset.catalog.item_ids[:3])
    )
    for read in users:
        state = stored[read.user.user_id]
        assert read.user.preference == state.preference
        assert read.user.watermark == state.watermark
    assert all(item.caption for item in items.values())
