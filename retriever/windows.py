"""Training windows: every prefix of each user's training sequence is a next-item example.

A causal encoder predicts item t+1 from items <= t at every position of one window, so a window
of ``max_len + 1`` items carries ``max_len`` examples (LlamaRec style). Sequences longer than
that are cut into windows ending every ``max_len`` items from the newest, so each training
target appears exactly once. Batches group windows of similar length to avoid padding work.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from tandem.data import PADDING_INDEX


def training_windows(sequences: Sequence[np.ndarray], max_len: int) -> list[np.ndarray]:
    """Windows of at most ``max_len + 1`` items (inputs = window[:-1], targets = window[1:])."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    windows = []
    for seq in sequences:
        for end in range(len(seq), 1, -max_len):
            windows.append(np.asarray(seq[max(0, end - max_len - 1) : end], dtype=np.int64))
    return windows


def left_pad(sequences: Sequence[np.ndarray], length: int | None = None) -> np.ndarray:
    """``[B, length]`` int64 with each sequence right-aligned and 0 (padding) on the left.

    Longer sequences keep their newest ``length`` items; ``length`` defaults to the longest.
    """
    if length is None:
        length = max((len(s) for s in sequences), default=0)
    out = np.full((len(sequences), length), PADDING_INDEX, dtype=np.int64)
    for row, seq in enumerate(sequences):
        tail = np.asarray(seq[-length:] if length else seq[:0], dtype=np.int64)
        if len(tail):
            out[row, length - len(tail) :] = tail
    return out


def batches(
    windows: list[np.ndarray], batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled batches of length-bucketed windows as (inputs, targets), both left-padded."""
    order = rng.permutation(len(windows))
    lengths = np.array([len(windows[i]) for i in order])
    order = order[np.argsort(lengths, kind="stable")]
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for chunk_index in rng.permutation(len(chunks)):
        chosen = [windows[i] for i in chunks[chunk_index]]
        yield left_pad([w[:-1] for w in chosen]), left_pad([w[1:] for w in chosen])
