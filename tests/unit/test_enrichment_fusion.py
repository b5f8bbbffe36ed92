"""CIT-Rec fusion: InfoNCE aligns content to ID vectors; missing modalities are masked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from enrichment.fusion import FusionConfig, FusionEncoder, encode, info_nce, train_fusion
from enrichment.items import (
    MODALITIES,
    ContentFeatures,
    ItemEmbeddings,
    ItemEnrichmentConfig,
    augmented_item_matrix,
    calibrated_scale,
    enrich_items,
    load_fusion,
    save_fusion,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _aligned_problem(n: int = 200, dim: int = 16, text_dim: int = 24, seed: int = 0):
    """Text features that are a noisy linear view of the ID vectors (so alignment is learnable)."""
    rng = np.random.default_rng(seed)
    ids = rng.normal(size=(n, dim)).astype(np.float32)
    mixing = rng.normal(size=(dim, text_dim)).astype(np.float32)
    text = ids @ mixing + 0.3 * rng.normal(size=(n, text_dim)).astype(np.float32)
    return ids, text / np.linalg.norm(text, axis=1, keepdims=True)


def test_info_nce_scores_aligned_pairs_better_than_shuffled():
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(32, 8, generator=generator)
    aligned = target + 0.05 * torch.randn(32, 8, generator=generator)
    shuffled = aligned[torch.randperm(32, generator=generator)]
    assert info_nce(aligned, target) < 0.1 < info_nce(shuffled, target)
    # symmetric: swapping the roles gives the same loss
    assert torch.isclose(info_nce(aligned, target), info_nce(target, aligned), atol=1e-5)


def test_training_lowers_the_loss_and_aligns_held_out_items():
    ids, text = _aligned_problem(n=150)
    config = FusionConfig(hidden=32, epochs=20, batch_size=50, patience=20, seed=0)
    encoder, report = train_fusion(
        {"text": text}, np.ones((len(ids), 1)), ids, np.arange(len(ids)), config
    )
    assert report.best_valid_loss < 0.5 * report.initial_valid_loss
    assert report.valid_recall_at_10 > 5 * report.chance_recall_at_10
    vectors = encode(encoder, {"text": text}, np.ones((len(ids), 1)))
    own = (vectors * ids / np.linalg.norm(ids, axis=1, keepdims=True)).sum(axis=1)
    other = (vectors * np.roll(ids, 1, axis=0) / np.linalg.norm(ids, axis=1, keepdims=True)).sum(1)
    assert (own > other).mean() > 0.9  # aligned pairs score higher than mismatched ones


def test_a_masked_modality_has_no_influence_on_the_vector():
    encoder = FusionEncoder({"text": 6, "image": 4}, out_dim=5, hidden=8).eval()
    text = torch.randn(3, 6)
    mask = torch.tensor([[1.0, 0.0]] * 3)
    with torch.inference_mode():
        a = encoder({"text": text, "image": torch.zeros(3, 4)}, mask)
        b = encoder({"text": text, "image": torch.randn(3, 4) * 100}, mask)
    assert torch.allclose(a, b)


def _content(n_items: int, text: np.ndarray, image: np.ndarray | None, has_image: np.ndarray):
    pad = np.zeros((1, text.shape[1]), dtype=np.float32)
    features = {"text": np.concatenate([pad, text])}
    masks = [np.concatenate([[False], np.ones(n_items, dtype=bool)])]
    if image is not None:
        features["image"] = np.concatenate([np.zeros((1, image.shape[1]), np.float32), image])
        masks.append(np.concatenate([[False], has_image]))
    return ContentFeatures(features, np.stack(masks, axis=1))


def test_enrich_items_records_modalities_and_gives_cold_items_their_content_vector(tmp_path):
    n = 120
    ids, text = _aligned_problem(n=n + 1, dim=8)
    ids[0] = 0.0
    text = text[1:]
    rng = np.random.default_rng(1)
    image = rng.normal(size=(n, 4)).astype(np.float32)
    has_image = np.arange(n) % 3 == 0  # a third of the items have an image
    image[~has_image] = 0.0
    counts = np.full(n + 1, 5)
    counts[0] = 0
    counts[[7, 50, 99]] = 0  # cold items: never in training
    config = ItemEnrichmentConfig(fusion=FusionConfig(hidden=16, epochs=5, batch_size=32))
    result = enrich_items(_content(n, text, image, has_image), ids, counts, config)
    items = result.items

    mask = items.modality_mask
    assert items.modalities == MODALITIES == ("text", "image", "id")
    assert mask.shape == (n + 1, 3) and mask[0].sum() == 0
    assert (mask[1:, 1] == has_image).all()  # image recorded only where one exists
    assert set(np.flatnonzero(mask[:, 2] == 0)) == {0, 7, 50, 99}
    assert set(np.flatnonzero(items.cold)) == {7, 50, 99}
    # cold items retrieve through their content vector, warm items keep their ID vector
    np.testing.assert_allclose(
        items.retrieval_embeddings[[7, 50, 99]], items.embeddings[[7, 50, 99]]
    )
    np.testing.assert_allclose(items.retrieval_embeddings[1:7], ids[1:7])
    assert not items.retrieval_embeddings[0].any() and not items.embeddings[0].any()
    # content vectors live at the ID vectors' scale (median norm)
    norms = np.linalg.norm(items.embeddings[1:], axis=1)
    assert np.allclose(norms, result.id_scale, rtol=1e-4)

    path = tmp_path / "items.safetensors"
    items.save(path)
    loaded = ItemEmbeddings.load(path)
    np.testing.assert_array_equal(loaded.modality_mask, items.modality_mask)
    np.testing.assert_array_equal(loaded.embeddings, items.embeddings)
    assert loaded.modalities == MODALITIES

    save_fusion(result.encoder, tmp_path / "fusion.safetensors", result.id_scale)
    encoder, scale = load_fusion(tmp_path / "fusion.safetensors")
    features = _content(n, text, image, has_image)
    again = encode(encoder, features.features, features.mask) * scale
    np.testing.assert_allclose(again[1:], items.embeddings[1:], rtol=1e-5, atol=1e-5)


def test_augmented_matrix_keeps_id_rows_for_cold_items_without_content():
    ids = np.arange(12, dtype=np.float32).reshape(4, 3)
    content = np.ones((4, 3), dtype=np.float32)
    content[2] = 0.0  # item 2 has no content at all
    matrix, cold = augmented_item_matrix(ids, content, np.array([0, 3, 0, 0]))
    assert cold.tolist() == [False, False, True, True]
    np.testing.assert_array_equal(matrix[1], ids[1])
    np.testing.assert_array_equal(matrix[2], ids[2])
    np.testing.assert_array_equal(matrix[3], content[3])
    assert not matrix[0].any()


def test_mismatched_retriever_and_catalog_sizes_are_refused():
    ids, text = _aligned_problem(n=11)
    with pytest.raises(ValueError, match="catalog has"):
        enrich_items(_content(10, text[1:], None, np.zeros(10, bool)), ids[:5], np.ones(11))


def test_calibrated_scale_recovers_the_id_score_slope():
    rng = np.random.default_rng(0)
    unit = rng.normal(size=(30, 6)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    ids = 2.5 * unit + 0.01 * rng.normal(size=unit.shape).astype(np.float32)
    users = rng.normal(size=(40, 6)).astype(np.float32)
    assert calibrated_scale(users, ids, unit, np.arange(5, 30)) == pytest.approx(2.5, rel=0.02)
    assert calibrated_scale(users, -ids, unit, np.arange(5, 30)) is None  # anti-aligned: unusable
    assert calibrated_scale(users, ids, unit, np.zeros(0, dtype=np.int64)) is None


def test_probe_users_switch_enrichment_to_the_calibrated_scale():
    n = 80
    ids, text = _aligned_problem(n=n + 1, dim=8)
    ids[0] = 0.0
    counts = np.full(n + 1, 3)
    fusion = FusionConfig(hidden=16, epochs=40, batch_size=32, valid_fraction=0.25)
    config = ItemEnrichmentConfig(fusion=fusion)
    content = _content(n, text[1:], None, np.zeros(n, bool))
    users = np.random.default_rng(2).normal(size=(50, 8)).astype(np.float32)
    result = enrich_items(content, ids, counts, config, probe_users=users)
    assert result.scale_method == "calibrated"
    assert result.summary()["content_scale_method"] == "calibrated"
    assert np.allclose(np.linalg.norm(result.items.embeddings[1:], axis=1), result.id_scale)
