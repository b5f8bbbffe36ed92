"""Content towers: the real MiniLM text tower and a tiny random CLIP vision tower."""

from __future__ import annotations

import numpy as np
import pytest

from enrichment.items import encode_content, item_texts
from enrichment.towers import ImageTower, TextTower, item_text, minilm_path
from tandem.data import Catalog
from tests.fixtures.enrichment import write_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_item_text_is_title_colon_caption_then_genres_and_year():
    assert (
        item_text("Toy Story", "toys come alive", ("Animation", "Comedy"), 1995)
        == "Toy Story : toys come alive. Genres: Animation, Comedy. Year: 1995"
    )
    assert item_text("Heat", None) == "Heat"


def test_real_minilm_embeds_similar_items_closer(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tower = TextTower(minilm_path(), batch_size=4)
    vectors = tower.encode(
        [
            item_text("Toy Story", "an animated film about toys", ("Animation",), 1995),
            item_text("Toy Story 2", "animated sequel about toys", ("Animation",), 1999),
            item_text("Schindler's List", "a war drama about the Holocaust", ("Drama",), 1993),
        ]
    )
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_image_tower_encodes_readable_images_and_reports_the_rest(tiny_clip_dir, tmp_path):
    good = write_images(tmp_path / "img", 3)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    paths = [str(good[0]), str(broken), str(good[1]), str(tmp_path / "missing.png"), str(good[2])]
    vectors, ok = ImageTower(tiny_clip_dir, batch_size=2).encode(paths)
    assert ok.tolist() == [True, False, True, False, True]
    assert vectors.shape == (5, 16)  # the projection head's size, not the hidden size
    np.testing.assert_allclose(np.linalg.norm(vectors[ok], axis=1), 1.0, rtol=1e-5)
    assert not vectors[~ok].any()


def test_image_modality_is_masked_not_faked_for_items_without_a_readable_image(
    tiny_clip_dir, tiny_text_tower_dir, tmp_path
):
    images = write_images(tmp_path / "img", 2)
    catalog = Catalog.from_records(
        item_ids=["a", "b", "c", "d"],
        titles=["Item 1", "Item 2", "Item 3", ""],
        genres=[("Drama",), ("Comedy",), (), ()],
        image_paths=[str(images[0]), None, str(tmp_path / "gone.png"), str(images[1])],
    )
    text_tower = TextTower(tiny_text_tower_dir)
    content = encode_content(
        catalog, {"a": "a caption"}, text_tower.encode, ImageTower(tiny_clip_dir).encode
    )
    assert content.modalities == ("text", "image")
    # row 0 is padding; "d" has no title and no caption: no text either
    assert content.mask.tolist() == [
        [False, False],
        [True, True],
        [True, False],
        [True, False],
        [False, True],
    ]
    assert content.image_paths == 3 and content.image_errors == 1
    assert not content.features["image"][[0, 2, 3]].any()
    assert not content.features["text"][[0, 4]].any()


def test_catalog_text_serves_as_caption_when_no_caption_was_generated():
    catalog = Catalog.from_records(
        item_ids=["a", "b"], titles=["A", "B"], texts=["from the catalog", None]
    )
    texts, has_text = item_texts(catalog, {"b": "generated"})
    assert texts == ["A : from the catalog", "B : generated"]
    assert has_text.all()


def test_no_readable_image_at_all_means_no_image_modality(
    tiny_clip_dir, tiny_text_tower_dir, tmp_path
):
    catalog = Catalog.from_records(
        item_ids=["a", "b"], titles=["Item 1", "Item 2"], image_paths=[str(tmp_path / "x.png")] * 2
    )
    content = encode_content(
        catalog, {}, TextTower(tiny_text_tower_dir).encode, ImageTower(tiny_clip_dir).encode
    )
    assert content.modalities == ("text",) and content.image_errors == 2
