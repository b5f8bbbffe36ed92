"""Chronological leave-one-out: last item test, second-last validation, the rest training.

This is the protocol of LlamaRec, MLLM4Rec and CoT-Rec. It is a pure function of the ordered
sequences, so it is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_SEQUENCE_LENGTH = 3


@dataclass(frozen=True)
class LeaveOneOutSplit:
    """Per user index: the training prefix, and the validation and test targets."""

    train: list[np.ndarray]
    valid_target: np.ndarray
    test_target: np.ndarray

    @property
    def num_users(self) -> int:
        return len(self.train)

    def valid_inputs(self) -> list[np.ndarray]:
        """Histories that predict the validation item: the training prefix."""
        return self.train

    def test_inputs(self) -> list[np.ndarray]:
        """Histories that predict the test item: the training prefix plus the validation item."""
        return [np.append(t, v) for t, v in zip(self.train, self.valid_target, strict=True)]


def leave_one_out(sequences: list[np.ndarray]) -> LeaveOneOutSplit:
    """Split oldest-first item sequences; every sequence needs at least three items."""
    short = [u for u, s in enumerate(sequences) if len(s) < MIN_SEQUENCE_LENGTH]
    if short:
        raise ValueError(
            f"{len(short)} user(s) have fewer than {MIN_SEQUENCE_LENGTH} interactions "
            f"(first user indices: {short[:5]}); filter them before splitting"
        )
    return LeaveOneOutSplit(
        train=[s[:-2] for s in sequences],
        valid_target=np.array([s[-2] for s in sequences], dtype=np.int64),
        test_target=np.array([s[-1] for s in sequences], dtype=np.int64),
    )


def hold_out_tail(split: LeaveOneOutSplit, n: int) -> LeaveOneOutSplit:
    """``split`` with each user's last ``n`` training items held out: the first becomes the
    validation target, the second the test target, the rest are never seen.

    A stage-2 ranker learns from its retriever's lists; on items the retriever trained on
    those lists are far easier than served ones (recall@20 about 0.5 on training positions vs
    0.32 on validation, benchmarks/results/ranker_headroom_relative.md), so a ranker trained
    there learns to over-trust its teacher. A retriever fitted on this split gives honest lists
    for the ``n`` held-out positions (``tandem ranker train --steps-per-user n``).
    """
    if n < 2:
        raise ValueError("hold out at least 2 items: one validates, one tests")
    short = [u for u, t in enumerate(split.train) if len(t) <= n]
    if short:
        raise ValueError(
            f"{len(short)} user(s) have at most {n} training items (first user indices: "
            f"{short[:5]}): hold out fewer"
        )
    return LeaveOneOutSplit(
        train=[t[:-n] for t in split.train],
        valid_target=np.array([t[-n] for t in split.train], dtype=np.int64),
        test_target=np.array([t[-n + 1] for t in split.train], dtype=np.int64),
    )
