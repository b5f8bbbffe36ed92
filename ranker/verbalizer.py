"""Letters <-> candidates: one token per candidate, scored from one forward pass (LlamaRec).

Candidate ``i`` of a prompt is named by the ``i``-th letter A..T. Its score is the log-softmax of
the last position's logits restricted to the letter tokens. LLMs prefer early letters, so the
candidates can be shown in a seeded permutation (or several, averaged) and the scores are mapped
back to candidate order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

LETTERS = tuple(chr(ord("A") + i) for i in range(20))
MAX_CANDIDATES = len(LETTERS)


class VerbalizerError(ValueError):
    """The tokenizer or the candidate list cannot be verbalized (message says why)."""


def letters_for(num_candidates: int) -> tuple[str, ...]:
    if not 1 <= num_candidates <= MAX_CANDIDATES:
        raise VerbalizerError(
            f"{num_candidates} candidates: the verbalizer names 1..{MAX_CANDIDATES} (A..T)"
        )
    return LETTERS[:num_candidates]


def letter_token_ids(
    tokenizer, num_candidates: int = MAX_CANDIDATES, prefix: str = ""
) -> tuple[int, ...]:
    """Token id of ``prefix + letter`` for each candidate; each must be exactly one token."""
    ids, bad = [], []
    for letter in letters_for(num_candidates):
        encoded = tokenizer.encode(prefix + letter, add_special_tokens=False)
        if len(encoded) != 1:
            bad.append(f"{prefix + letter!r} -> {len(encoded)} tokens")
        else:
            ids.append(encoded[0])
    if bad:
        raise VerbalizerError(
            "the tokenizer splits verbalizer letters, so one-pass letter scoring cannot work: "
            + ", ".join(bad)
            + ". Use an LLM whose tokenizer has single tokens for A..T."
        )
    if len(set(ids)) != len(ids):
        raise VerbalizerError("two verbalizer letters map to the same token id")
    return tuple(ids)


def check_letters(tokenizer, prefix: str = "") -> None:
    """Raise VerbalizerError unless every letter A..T (with ``prefix``) is one distinct token."""
    letter_token_ids(tokenizer, MAX_CANDIDATES, prefix)


def letter_log_probs(logits: np.ndarray, letter_ids: Sequence[int]) -> np.ndarray:
    """Log-softmax over the letter tokens of last-position logits (``[..., vocab]``)."""
    picked = np.asarray(logits, dtype=np.float64)[..., list(letter_ids)]
    shifted = picked - picked.max(axis=-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))).astype(np.float32)


def candidate_key(titles: Sequence[str]) -> int:
    """A stable integer from the candidates: a permutation depends on the inputs only."""
    digest = hashlib.sha256("\x1f".join(titles).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def permutations(
    num_candidates: int, count: int = 1, *, shuffle: bool = True, seed: int = 0, key: int = 0
) -> np.ndarray:
    """``[count, n]`` orders: row ``p`` lists which candidate sits at each prompt position.

    Without ``shuffle`` the first order is the given one (retriever order, as LlamaRec ranks);
    every other order is a permutation drawn from ``(seed, key)``.
    """
    if count < 1:
        raise VerbalizerError(f"permutation count must be >= 1, got {count}")
    if count == 1 and not shuffle:  # the given order alone: no generator to seed per request
        return np.arange(num_candidates, dtype=np.int64)[None]
    rng = np.random.default_rng([seed, key])
    orders = [rng.permutation(num_candidates) for _ in range(count)]
    if not shuffle:
        orders[0] = np.arange(num_candidates)
    return np.stack(orders).astype(np.int64)


def to_candidate_order(scores: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """Mean over permutations of each candidate's score (``scores[p, position]`` -> ``[n]``)."""
    scores = np.asarray(scores, dtype=np.float32)
    if scores.shape != orders.shape:
        raise VerbalizerError(f"scores {scores.shape} do not match orders {orders.shape}")
    out = np.zeros(orders.shape[1], dtype=np.float64)
    for row, order in zip(scores, orders, strict=True):
        out[order] += row
    return (out / len(orders)).astype(np.float32)
