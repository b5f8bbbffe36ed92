"""``--engine ray``: the same outputs as the local engine, from a local Ray instance (2 workers)."""

from __future__ import annotations

import numpy as np
import pytest

from enrichment.checkpoint import JsonlCheckpoint
from enrichment.generation import GeneratorSpec
from enrichment.items import encode_content
from enrichment.preferences import PreferenceConfig, item_lines, run_preferences, user_histories
from enrichment.towers import TextTower
from tandem.testing.data import synthetic_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_workers():
    pytest.importorskip("ray")
    from enrichment.ray_engine import ray_session

    with ray_session(2):
        yield 2


@pytest.fixture(scope="module")
def dataset():
    return synthetic_dataset(num_users=6, num_items=24, min_len=7, max_len=10, seed=5)


def test_ray_item_encoding_matches_the_local_engine(ray_workers, dataset, tiny_text_tower_dir):
    from enrichment.ray_engine import RayTextEncoder

    encoders = {
        "local": TextTower(tiny_text_tower_dir, batch_size=8).encode,
        "ray": RayTextEncoder(tiny_text_tower_dir, batch_size=8, workers=ray_workers),
    }
    content = {
        engine: encode_content(dataset.catalog, {"i3": "a caption"}, encode, chunk_size=None)
        for engine, encode in encoders.items()
    }
    np.testing.assert_allclose(
        content["ray"].features["text"], content["local"].features["text"], rtol=1e-4, atol=1e-5
    )
    np.testing.assert_array_equal(content["ray"].mask, content["local"].mask)


def test_ray_preference_extraction_matches_the_local_engine(
    ray_workers, dataset, chatty_llm_dir, tmp_path
):
    histories = user_histories(dataset)
    lines = item_lines(dataset.catalog)
    spec = GeneratorSpec(model_dir=str(chatty_llm_dir), max_new_tokens=6)
    config = PreferenceConfig(window=4, stride=2)
    outputs = {}
    for engine in ("local", "ray"):
        checkpoint = JsonlCheckpoint(tmp_path / engine / "p.jsonl", "user_id", {})
        stats = run_preferences(
            histories,
            lines,
            spec,
            config,
            checkpoint,
            chunk_users=2,
            engine=engine,
            workers=ray_workers,
        )
        assert stats.users == len(histories) and stats.users_per_minute > 0
        outputs[engine] = checkpoint.done
    assert outputs["ray"] == outputs["local"]
