"""Letters <-> candidates, the one-token letter check, and permutation averaging."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from ranker.llm import LLMError, load_tokenizer
from ranker.verbalizer import (
    LETTERS,
    VerbalizerError,
    check_letters,
    letter_log_probs,
    letter_token_ids,
    permutations,
    to_candidate_order,
)


class _SplittingTokenizer:
    """Failure injection: a tokenizer that needs two tokens for some letters."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [1, 2] if text.strip() in {"Q", "R"} else [ord(text.strip())]


def test_letters_map_to_distinct_single_tokens(tiny_llm_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir)
    ids = letter_token_ids(tokenizer)
    assert len(ids) == len(set(ids)) == 20
    assert [tokenizer.decode([i]) for i in ids] == list(LETTERS)


def test_letter_check_names_the_split_letters():
    with pytest.raises(VerbalizerError, match=r"'Q' -> 2 tokens, 'R' -> 2 tokens"):
        check_letters(_SplittingTokenizer())


def test_loading_an_llm_dir_without_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(LLMError, match="tandem llm prepare"):
        load_tokenizer(tmp_path)


def test_letter_log_probs_are_a_distribution_over_letters_only():
    logits = np.random.default_rng(0).normal(size=(3, 50))
    scores = letter_log_probs(logits, [5, 7, 9])
    assert scores.shape == (3, 3)
    np.testing.assert_allclose(np.exp(scores).sum(axis=1), 1.0, rtol=1e-5)
    assert np.argmax(scores[0]) == np.argmax(logits[0, [5, 7, 9]])


def test_unshuffled_first_order_is_the_given_order_and_orders_are_seeded():
    orders = permutations(20, 4, shuffle=False, seed=1, key=99)
    np.testing.assert_array_equal(orders[0], np.arange(20))
    np.testing.assert_array_equal(orders, permutations(20, 4, shuffle=False, seed=1, key=99))
    assert not np.array_equal(orders, permutations(20, 4, shuffle=False, seed=1, key=98))
    assert all(sorted(row) == list(range(20)) for row in orders)


def test_permutation_scores_map_back_to_candidate_order():
    value = np.linspace(-3, -1, 20).astype(np.float32)  # a score that belongs to each candidate
    orders = permutations(20, 5, seed=3)
    shown = np.stack([value[order] for order in orders])  # scores as read at prompt positions
    np.testing.assert_allclose(to_candidate_order(shown, orders), value, rtol=1e-6)


def test_permutation_averaging_cancels_pure_position_bias():
    bias = -np.arange(4, dtype=np.float32)  # the model only likes early positions
    orders = np.array([[0, 1, 2, 3], [1, 2, 3, 0], [2, 3, 0, 1], [3, 0, 1, 2]])
    averaged = to_candidate_order(np.stack([bias] * 4), orders)
    np.testing.assert_allclose(averaged, averaged[0])
