"""Exploration slots: cold items fill the tail of a top-k, chosen by the user's vector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retriever.cold_slots import ColdSlots, fill_cold_slots, table_with_cold_rows
from retriever.core import Retriever


def test_the_best_cold_items_by_inner_product_skip_the_barred_ones() -> None:
    cold = ColdSlots(np.array([5, 6, 7]), np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]), 2)
    items, scores = cold.best(np.array([1.0, 0.5]), 2, barred=np.array([7]))
    assert items.tolist() == [5, 6]
    np.testing.assert_allclose(scores, [1.0, 0.5])
    assert cold.best(np.array([1.0, 0.5]), 0, np.array([], dtype=np.int64))[0].size == 0


def test_slots_keep_the_warm_head_and_fill_the_tail() -> None:
    cold = ColdSlots(np.array([8, 9, 10]), np.array([[3.0], [1.0], [2.0]]), 2)
    warm, warm_scores = np.array([1, 2, 3, 9]), np.array([4.0, 3.5, 3.0, 2.5])
    items, scores = fill_cold_slots(warm, warm_scores, np.array([1.0]), cold, 4, np.array([8]))
    # the warm list is cut to k - slots; 8 is history, so 10 then 9 fill the slots
    assert items.tolist() == [1, 2, 10, 9]
    np.testing.assert_allclose(scores, [4.0, 3.5, 2.0, 1.0])


def test_bad_cold_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="slots"):
        ColdSlots(np.array([1]), np.zeros((1, 2)), -1)
    with pytest.raises(ValueError, match="padding"):
        ColdSlots(np.array([0]), np.zeros((1, 2)), 1)
    with pytest.raises(ValueError, match="dimensions"):
        table_with_cold_rows(np.zeros((4, 3)), ColdSlots(np.array([1]), np.zeros((1, 2)), 1))
    with pytest.raises(ValueError, match="outside"):
        table_with_cold_rows(np.zeros((4, 2)), ColdSlots(np.array([4]), np.zeros((1, 2)), 1))


@pytest.fixture(scope="module")
def retriever(tiny_retriever_run: Path) -> Retriever:
    return Retriever.load(tiny_retriever_run)


def test_the_cold_item_that_matches_the_user_gets_the_slot(retriever: Retriever) -> None:
    history = ["i3", "i7", "i12", "i20"]
    plain = retriever.retrieve(history, k=40)
    user = retriever.user_vectors([retriever._indices(history)[0]])[0]
    # three items far down the plain ranking become cold, each scoring below the warm head
    # for this user: the last one best, the first one worst
    names = [item for item, _ in plain[30:33]]
    indices = retriever._indices(names)[0]
    below_head = plain[9][1] - np.array([3.0, 2.0, 1.0])
    vectors = below_head[:, None] * user[None] / float(user @ user)
    served = retriever.with_cold_slots(ColdSlots(indices, vectors.astype(np.float32), 2))

    found = served.retrieve(history, k=10)
    assert [item for item, _ in found[:8]] == [item for item, _ in plain[:8]]
    assert [item for item, _ in found[8:]] == [names[2], names[1]]
    scores = [score for _, score in found]
    assert scores == sorted(scores, reverse=True)  # a score-sorting consumer keeps the order
    # history and exclusions are never given a slot
    excluded = served.retrieve(history, k=10, exclude=[names[2]])
    assert [item for item, _ in excluded[8:]] == [names[1], names[0]]
    # the table the ranker reads carries the cold vectors too
    np.testing.assert_allclose(served.item_embeddings()[indices], vectors, rtol=1e-6)
    assert retriever.cold is None and served.cold is not None


def test_slots_wider_than_k_serve_only_cold_items(retriever: Retriever) -> None:
    indices = retriever._indices(["i40", "i41"])[0]
    vectors = np.asarray(retriever.item_embeddings()[indices])
    served = retriever.with_cold_slots(ColdSlots(indices, vectors, 5))
    found = served.retrieve(["i1", "i2"], k=3)
    assert sorted(item for item, _ in found) == ["i40", "i41"]
