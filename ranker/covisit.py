"""What other people watched next: item-to-item co-visitation counts from training sequences.

A sequence model squeezes a user into one vector; a stage-2 ranker can add the explicit
evidence "people who watched this user's last items went on to watch this candidate" (the
co-visitation / ItemKNN signal of production re-rankers). The table counts the pair (a, b)
whenever b follows a within ``WINDOW`` positions of one training sequence.

The requesting user's own pairs are always left out ("other people"): a training example
would otherwise find its own target through the table (its user's pair last item -> target is
counted), learn to trust that, and fail on unseen data. Training leaves out the user's whole
training sequence; evaluation and serving leave out the pairs within the request's history,
which for a known user is the same sequence, so every path computes the same quantity. (For a
user the table never saw, the pairs within their history were never counted, and leaving them
out under-counts slightly; counts never go below 0.)

Saved sparse as safetensors with the run, so serving reads exactly what training counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

WINDOW = 5  # b counts for a when it follows within this many positions
RECENT = 5  # history items a candidate is compared with
COVISIT_FILE = "covisit.safetensors"
WIDTH = 2  # columns: from the last item, from the last RECENT items


@dataclass(frozen=True)
class CovisitTable:
    counts: np.ndarray  # [num_items + 1, num_items + 1] int32; row a, column b: a then b

    @classmethod
    def build(cls, sequences: list[np.ndarray], num_items: int) -> CovisitTable:
        """From training sequences of item indices (1-based, oldest first)."""
        counts = np.zeros((num_items + 1, num_items + 1), dtype=np.int32)
        for seq in sequences:
            seq = np.asarray(seq, dtype=np.int64)
            for gap in range(1, WINDOW + 1):
                if len(seq) > gap:
                    np.add.at(counts, (seq[:-gap], seq[gap:]), 1)
        return cls(counts)

    def features(
        self, history: np.ndarray, candidates: np.ndarray, own: np.ndarray | None = None
    ) -> np.ndarray:
        """``[n, 2]``: log1p of other people's counts from the last history item and from the
        last ``RECENT`` ones to each candidate. ``own`` is the sequence whose pairs are left out
        (default: ``history``). Index 0 (unknown) counts nothing."""
        candidates = np.asarray(candidates, dtype=np.int64)
        recent = np.asarray(history, dtype=np.int64)[-RECENT:]
        if not len(recent):
            return np.zeros((len(candidates), WIDTH), dtype=np.float32)
        block = self.counts[np.ix_(recent, candidates)].astype(np.int64)
        block -= _own_pairs(np.asarray(history if own is None else own), recent, candidates)
        block = np.maximum(block, 0)
        block[recent == 0] = 0
        block[:, candidates == 0] = 0
        return np.log1p(np.stack([block[-1], block.sum(axis=0)], axis=1)).astype(np.float32)

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        rows, cols = np.nonzero(self.counts)
        save_file(
            {
                "rows": rows.astype(np.int32),
                "cols": cols.astype(np.int32),
                "counts": self.counts[rows, cols].astype(np.int32),
                "size": np.array([self.counts.shape[0]], dtype=np.int32),
            },
            str(path),
        )

    @classmethod
    def load(cls, path: Path) -> CovisitTable:
        from safetensors.numpy import load_file

        saved = load_file(str(path))
        size = int(saved["size"][0])
        counts = np.zeros((size, size), dtype=np.int32)
        counts[saved["rows"], saved["cols"]] = saved["counts"]
        return cls(counts)


def _own_pairs(own: np.ndarray, recent: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """``[len(recent), n]`` counts of the pairs (recent item, candidate) within ``own``,
    counted as ``CovisitTable.build`` counts them."""
    out = np.zeros((len(recent), len(candidates)), dtype=np.int64)
    columns: dict[int, list[int]] = {}
    for k, item in enumerate(candidates.tolist()):
        columns.setdefault(item, []).append(k)
    own = own.astype(np.int64)
    for at in np.flatnonzero(np.isin(own, recent)):
        rows = recent == own[at]
        for item in own[at + 1 : at + 1 + WINDOW].tolist():
            for k in columns.get(item, ()):
                out[rows, k] += 1
    return out
