"""Captions: item perception by the LLM, image captions, and the content-hash cache."""

from __future__ import annotations

import json

import pytest

from enrichment.captions import (
    CaptionCache,
    CaptionConfig,
    ImageCaptioner,
    caption_items,
    read_captions,
)
from enrichment.generation import TransformersGenerator
from enrichment.runs import run_captions
from tandem.data import Catalog
from tandem.testing.data import synthetic_dataset
from tests.fixtures.enrichment import write_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = CaptionConfig(max_words=6, chunk_items=4)


@pytest.fixture
def generator(chatty_llm_dir):
    return TransformersGenerator(chatty_llm_dir, max_new_tokens=10, batch_size=8)


def _catalog(titles, image_paths=None) -> Catalog:
    return Catalog.from_records(
        item_ids=[f"i{n}" for n in range(len(titles))],
        titles=titles,
        years=[1990 + n for n in range(len(titles))],
        genres=[("Drama",)] * len(titles),
        image_paths=image_paths,
    )


def test_perception_captions_are_deterministic_capped_and_cached(generator, tmp_path):
    catalog = _catalog(["Heat", "Babe", "Seven", "Clerks", "Nadja"])
    cache = CaptionCache(tmp_path / "cache.jsonl")
    first, stats = caption_items(catalog, cache, generator, "llm:tiny", config=CONFIG)
    assert stats.from_llm + stats.empty == 5 and stats.cached == 0
    assert all(0 < len(c.split()) <= 6 and "\n" not in c for c in first.values())

    fresh, _ = caption_items(
        catalog, CaptionCache(tmp_path / "other.jsonl"), generator, "llm:tiny", config=CONFIG
    )
    assert fresh == first  # greedy decoding: same input, same caption

    tokens = generator.completion_tokens
    again, stats = caption_items(
        catalog, CaptionCache(tmp_path / "cache.jsonl"), generator, "llm:tiny", config=CONFIG
    )
    assert again == first and stats.cached == 5 and generator.completion_tokens == tokens

    changed = _catalog(["Heat", "Babe", "Se7en", "Clerks", "Nadja"])
    _, stats = caption_items(
        changed, CaptionCache(tmp_path / "cache.jsonl"), generator, "llm:tiny", config=CONFIG
    )
    assert stats.cached == 4 and stats.from_llm + stats.empty == 1  # only the edited item


def test_items_with_images_use_the_image_captioner_and_broken_ones_fall_back(
    generator, tiny_captioner_dir, tmp_path
):
    images = write_images(tmp_path / "img", 2)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"garbage")
    catalog = _catalog(
        ["Heat", "Babe", "Seven", "Clerks"], [str(images[0]), None, str(broken), str(images[1])]
    )
    captioner = ImageCaptioner(tiny_captioner_dir, max_new_tokens=8)
    captions, stats = caption_items(
        catalog,
        CaptionCache(tmp_path / "cache.jsonl"),
        generator,
        "llm:tiny",
        captioner=captioner,
        config=CONFIG,
    )
    assert stats.from_image == 2  # i0 and i3
    assert stats.from_llm + stats.empty == 2  # i1 (no image) and i2 (undecodable image)
    assert set(captions) <= {"i0", "i1", "i2", "i3"}
    assert {"i0", "i3"} <= set(captions)


def test_the_run_writes_feature_store_captions_and_a_manifest(generator, tmp_path):
    dataset = synthetic_dataset(num_users=5, num_items=12)
    run_dir, _, metrics = run_captions(
        dataset,
        tmp_path,
        generator=generator,
        generator_source="llm:tiny",
        config=CONFIG,
        max_items=5,
    )
    records = [json.loads(line) for line in (run_dir / "captions.jsonl").read_text().splitlines()]
    assert records and all(set(r) == {"item_id", "caption"} and r["caption"] for r in records)
    assert read_captions(run_dir) == {r["item_id"]: r["caption"] for r in records}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["kind"] == "enrichment-captions" and metrics["items"] == 5
    assert (run_dir.parent / "cache.jsonl").is_file()  # shared by later runs
