"""Faiss item index: exact for flat, exclusions always honoured, padding never returned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retriever.index import IndexConfig, ItemIndex, recall_against_exact


def item_table(num_items: int = 200, dim: int = 8, seed: int = 0) -> np.ndarray:
    table = np.random.default_rng(seed).normal(size=(num_items + 1, dim)).astype(np.float32)
    table[0] = 100.0  # a padding row that would win every query if it were indexed
    return table


def brute_force(table: np.ndarray, query: np.ndarray, k: int, barred=()) -> list[int]:
    scores = table @ query
    scores[0] = -np.inf
    scores[list(barred)] = -np.inf
    return [int(i) for i in np.argsort(-scores, kind="stable")[:k]]


def test_flat_search_is_exact_and_skips_padding() -> None:
    table = item_table()
    index = ItemIndex.build(table)
    queries = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32)
    items, scores = index.search(queries, 10)
    for q in range(4):
        assert list(items[q]) == brute_force(table, queries[q], 10)
        np.testing.assert_allclose(scores[q], table[items[q]] @ queries[q], rtol=1e-5)
    assert (items != 0).all()


def test_each_query_has_its_own_exclusions() -> None:
    table = item_table()
    index = ItemIndex.build(table)
    queries = np.random.default_rng(2).normal(size=(2, 8)).astype(np.float32)
    first_top = brute_force(table, queries[0], 5)
    exclude = [np.array(first_top), np.array([], dtype=np.int64)]
    items, _ = index.search(queries, 5, exclude)
    assert not set(items[0]) & set(first_top)
    assert list(items[0]) == brute_force(table, queries[0], 5, first_top)
    assert list(items[1]) == brute_force(table, queries[1], 5)


def test_repeated_and_out_of_catalog_exclusions_bar_only_catalog_items() -> None:
    table = item_table()
    index = ItemIndex.build(table)
    query = table[200]  # the last item is its own best match
    top = brute_force(table, query, 3)
    assert top[0] == 200
    # -1 would bar item 200 and 201 would fall off the table if they were taken as indices
    barred = np.array([top[1], top[1], top[2], 0, -1, -200, 201, 10_000])
    items, _ = index.search(query[None], 10, [barred])
    assert list(items[0]) == brute_force(table, query, 10, top[1:])
    assert items[0][0] == 200


def test_when_nearly_everything_is_excluded_the_rest_is_returned_then_padding() -> None:
    table = item_table(num_items=50)
    index = ItemIndex.build(table)
    keep = {7, 19, 42}
    barred = np.array([i for i in range(1, 51) if i not in keep])
    items, scores = index.search(table[7][None], 5, [barred])
    assert set(items[0][:3]) == keep
    assert list(items[0][3:]) == [0, 0]
    assert np.isneginf(scores[0][3:]).all()


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_recall_and_fall_back_when_short(kind: str) -> None:
    table = item_table(num_items=2000, dim=16)
    index = ItemIndex.build(table, IndexConfig(kind=kind, nprobe=8))
    queries = np.random.default_rng(3).normal(size=(20, 16)).astype(np.float32)
    assert recall_against_exact(index, queries, k=20) > 0.7
    barred = np.arange(1, 1990)
    items, _ = index.search(queries[:1], 5, [barred])
    assert list(items[0]) == brute_force(table, queries[0], 5, barred)


def test_flat_recall_against_exact_is_one() -> None:
    table = item_table()
    queries = np.random.default_rng(4).normal(size=(10, 8)).astype(np.float32)
    assert recall_against_exact(ItemIndex.build(table), queries) == 1.0


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    table = item_table()
    config = IndexConfig(kind="hnsw", ef_search=64)
    index = ItemIndex.build(table, config)
    index.save(tmp_path / "index.faiss")
    loaded = ItemIndex.load(tmp_path / "index.faiss", table, config)
    query = table[5][None]
    np.testing.assert_array_equal(loaded.search(query, 10)[0], index.search(query, 10)[0])
    with pytest.raises(ValueError, match="rebuild"):
        ItemIndex.load(tmp_path / "index.faiss", table[:-3], config)
    with pytest.raises(FileNotFoundError, match="tandem retriever index"):
        ItemIndex.load(tmp_path / "missing.faiss", table, config)


def test_bad_arguments() -> None:
    index = ItemIndex.build(item_table())
    with pytest.raises(ValueError, match="k must be"):
        index.search(np.zeros((1, 8), np.float32), 0)
    with pytest.raises(ValueError, match="exclusion lists"):
        index.search(np.zeros((2, 8), np.float32), 3, [np.array([1])])
    with pytest.raises(ValueError, match="unknown index kind"):
        IndexConfig(kind="lsh")
