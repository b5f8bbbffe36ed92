"""Score fusion: the weight's two ends, scale invariance, and safe numbers."""

from __future__ import annotations

import numpy as np
import pytest

from ranker.fusion import fuse, log_softmax, order


def test_weight_zero_keeps_retriever_order_and_one_is_ranker_alone():
    retrieval = np.array([9.0, 5.0, 1.0, 0.5])
    ranker = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    assert order(fuse(retrieval, ranker, 0.0)).tolist() == [0, 1, 2, 3]
    assert order(fuse(retrieval, ranker, 1.0)).tolist() == [3, 2, 1, 0]
    assert order(fuse(retrieval, None, 0.7)).tolist() == [0, 1, 2, 3]


def test_fusion_does_not_depend_on_the_retriever_score_offset():
    retrieval = np.array([3.0, 2.5, 2.0])
    ranker = np.log(np.array([0.2, 0.5, 0.3]))
    np.testing.assert_allclose(fuse(retrieval, ranker, 0.5), fuse(retrieval + 100, ranker, 0.5))


def test_middle_weight_blends_both_signals():
    retrieval = np.array([2.0, 1.9, 0.0])
    ranker = np.log(np.array([0.05, 0.9, 0.05]))
    assert order(fuse(retrieval, ranker, 0.5)).tolist()[0] == 1


def test_log_softmax_is_a_distribution_and_non_finite_scores_stay_finite():
    out = log_softmax(np.array([1.0, -np.inf, np.nan, 2.0]))
    assert np.isfinite(out).all()
    assert np.exp(out).sum() == pytest.approx(1.0)


def test_ties_keep_retriever_order():
    assert order(np.array([1.0, 2.0, 2.0, 1.0])).tolist() == [1, 2, 0, 3]


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="3 candidates"):
        fuse(np.zeros(3), np.zeros(2), 0.5)
