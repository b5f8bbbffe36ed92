"""Metrics by hand (ties, misses, K beyond the list) and full-ranking evaluation with masking."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tandem.evaluate import EvaluationResult, evaluate_full_ranking, render_table
from tandem.metrics import (
    hit_rate_at_1,
    mrr_at_k,
    ndcg_at_k,
    ranking_table,
    ranks_from_scores,
    ranks_in_lists,
    recall_at_k,
    sampled_auc,
)


def test_metrics_by_hand_with_a_miss() -> None:
    ranks = np.array([0, 2, 9, -1])  # first, third, tenth, not found
    assert recall_at_k(ranks, 1) == 0.25
    assert recall_at_k(ranks, 3) == 0.5
    assert recall_at_k(ranks, 10) == 0.75
    assert ndcg_at_k(ranks, 3) == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert ndcg_at_k(ranks, 10) == pytest.approx((1 + 0.5 + 1 / math.log2(11)) / 4)
    assert mrr_at_k(ranks, 10) == pytest.approx((1 + 1 / 3 + 1 / 10) / 4)
    assert mrr_at_k(ranks, 2) == pytest.approx(1 / 4)
    assert hit_rate_at_1(ranks) == 0.25


def test_k_larger_than_the_list_counts_every_hit_once() -> None:
    ranks = ranks_in_lists(np.array([[4, 5, 6], [7, 8, 9]]), np.array([6, 1]))
    np.testing.assert_array_equal(ranks, [2, -1])
    assert recall_at_k(ranks, 50) == 0.5
    assert ndcg_at_k(ranks, 50) == pytest.approx(0.5 / math.log2(4))


def test_ties_are_pessimistic_so_constant_scores_score_zero() -> None:
    scores = np.zeros((3, 5))
    ranks = ranks_from_scores(scores, np.array([0, 2, 4]))
    np.testing.assert_array_equal(ranks, [4, 4, 4])
    scores = np.array([[0.1, 0.9, 0.9, 0.3]])  # target (col 2) ties with col 1
    assert ranks_from_scores(scores, np.array([2]))[0] == 1
    assert ranks_from_scores(scores, np.array([3]))[0] == 2


def test_metrics_can_fail_and_reject_bad_k() -> None:
    misses = np.array([-1, -1, 30])
    table = ranking_table(misses, (5, 10, 20))
    assert all(value == 0.0 for value in table.values())
    assert ranking_table(np.array([], dtype=np.int64))["ndcg@10"] == 0.0
    with pytest.raises(ValueError):
        recall_at_k(misses, 0)


def test_sampled_auc_counts_ties_as_half() -> None:
    auc = sampled_auc(np.array([1.0, 0.0]), np.array([[0.0, 2.0], [0.0, 0.0]]))
    assert auc == pytest.approx((0.5 + 0.5) / 2)


def test_full_ranking_masks_history_and_padding_but_keeps_the_target() -> None:
    # 6 items (+ padding column 0). Item 5 is the best-scored, item 4 second.
    base = np.array([9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.5], dtype=np.float32)
    histories = [np.array([5, 4]), np.array([1]), np.array([2, 3])]
    targets = np.array([3, 6, 3])  # user 3's target is also in its history (a repeat)

    def score(batch: list[np.ndarray]) -> np.ndarray:
        return np.tile(base, (len(batch), 1))

    result = evaluate_full_ranking(score, histories, targets, split="valid", batch_size=2)
    # user 0: 5 and 4 masked, padding masked -> 3 is first. user 1: 6 is last of 5 unmasked.
    # user 2: history {2, 3} masked except the target 3 -> 5, 4 rank above it.
    np.testing.assert_array_equal(result.ranks, [0, 4, 2])
    assert result.metrics["recall@5"] == 1.0
    assert result.metrics["mrr@5"] == pytest.approx((1 + 1 / 5 + 1 / 3) / 3)
    assert result.to_dict()["users"] == 3
    assert result.to_dict()["split"] == "valid"


def test_full_ranking_rejects_bad_inputs() -> None:
    def score(batch: list[np.ndarray]) -> np.ndarray:
        return np.zeros((len(batch), 3), dtype=np.float32)

    with pytest.raises(ValueError, match="targets"):
        evaluate_full_ranking(score, [np.array([1])], np.array([0]))
    with pytest.raises(ValueError, match="num_items"):
        evaluate_full_ranking(score, [np.array([1])], np.array([5]))
    with pytest.raises(ValueError, match="histories"):
        evaluate_full_ranking(score, [np.array([1])], np.array([1, 2]))


def test_render_table_has_one_row_per_k() -> None:
    result = EvaluationResult("test", np.array([0, 3]), ranking_table(np.array([0, 3])))
    table = render_table(result, title="demo")
    assert table.row_count == 3
    assert "2 users" in str(table.title)
